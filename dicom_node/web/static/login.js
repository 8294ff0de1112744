// The sign-in page's only script (served before sign-in, like the page itself): where to go next, and
// whether the last try failed.
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const params = new URLSearchParams(location.search);
  const next = params.get("next") || "/";
  document.getElementById("next").value = next.startsWith("/") && !next.startsWith("//") ? next : "/";
  document.getElementById("failed").hidden = !params.has("failed");
});

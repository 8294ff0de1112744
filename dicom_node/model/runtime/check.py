"""``python -m dicom_node.model.runtime.check JOB``: the agreement checks, in a process of their own.

Started by :func:`dicom_node.model.runtime.choose_runtime` (which holds the cache lock meanwhile);
JOB is a JSON object with the model directory, the candidates and where to write the results.
"""

from __future__ import annotations

import json
import logging
import sys

from dicom_node.lifetime import die_with_parent


def main(argv: list[str]) -> int:
    die_with_parent()
    job = json.loads(argv[1])
    from dicom_node.logs import setup_logging

    setup_logging(logging.getLevelName(job["log_level"]))
    from dicom_node.model.runtime import run_checks

    run_checks(job["model_dir"], job["names"], job["threads"], job["requested"], job["results_path"], job["keys"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""``dicom-node serve``: run the node until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import os

from dicom_node.cli.common import load_or_explain


def run(args: argparse.Namespace) -> int:
    from dicom_node.logs import LOG_FORMAT_ENV, setup_logging
    from dicom_node.node import serve

    config = load_or_explain(args)
    if config is None:
        return 2
    # --log-level / --log-format win over the file; they go into the configuration itself because
    # the workers set up their logging from it (worker_setup): the node and its workers must log
    # at one level and in one format. argparse has already checked both against their choices.
    overrides = {key: value for key, value in (("log_level", args.log_level), ("log_format", args.log_format))
                 if value is not None}
    if overrides:
        config = config.model_copy(update=overrides)
    setup_logging(config.log_level, config.log_format)
    # Helper processes that set up logging on their own (the runtime agreement check, the background
    # `model fetch`) read the format from the environment: a shipper reading the node's JSON must not
    # get their text lines in the middle. Set only now, once the configuration has been read: the
    # variable also overrides the file's log_format (pydantic-settings), with the same value.
    os.environ[LOG_FORMAT_ENV] = config.log_format
    return serve(config)

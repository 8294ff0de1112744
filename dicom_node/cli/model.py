"""``dicom-node model fetch | make-test``: get the official weights, or write an untrained test model.

``model fetch`` exits 0 when the model is installed and 1 with one ``error:`` line on stderr
otherwise: the node runs it as a child process and reports its exit code.
"""

from __future__ import annotations

import argparse
import sys


def run(args: argparse.Namespace) -> int:
    if args.model_command == "make-test":
        from dicom_node.model.untrained import make_test_model_dir

        path = make_test_model_dir(args.dir, small=args.small)
        print(f"wrote an UNTRAINED {'small ' if args.small else ''}M2FP model (random weights) to {path}")
        return 0
    from dicom_node.model.fetch import LICENCE_NOTE, MODEL_REVISION, FetchError, fetch_model, staging_dir_for

    try:
        # --force is read when the parser offers it (replacing a model is refused otherwise)
        record = fetch_model(args.dir, revision=args.revision, force=bool(getattr(args, "force", False)))
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        where = staging_dir_for(args.dir.absolute(), args.revision or MODEL_REVISION)
        print(f"error: interrupted; {args.dir} is unchanged, the partial download is kept in {where} "
              "and the next `dicom-node model fetch` resumes it", file=sys.stderr)
        return 1
    what = "an UNTRAINED model (random weights; its outputs mean nothing)" if record.untrained else "M2FP weights"
    print(f"{what} ready in {args.dir}: {record.model_id} revision {record.revision} from {record.hub}, "
          f"sha256 {record.sha256}, state-dict digest {record.state_dict_digest[:16]}. {LICENCE_NOTE}")
    return 0

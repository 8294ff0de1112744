"""``dicom-node echo`` and ``dicom-node send``: C-ECHO a peer, C-STORE files to one (a small SCU
for demos, tests and checking a destination before the first photo). ``echo`` of a DICOMweb
destination asks its root a QIDO-RS question instead (DICOMweb has no echo)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from pathlib import Path

from dicom_node.cli.common import load_or_explain
from dicom_node.config import Destination
from dicom_node.dispatch import stow
from dicom_node.dispatch.dispatcher import dimse_peer
from dicom_node.dispatch.scu import AssociationError, Peer, PeerLike, echo, store_files
from dicom_node.net import status


def _peer_from_text(text: str, ae_title: str | None) -> Peer:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{text!r} is not HOST:PORT")
    return Peer(ae_title or "ANY-SCP", host, int(port))


def run_echo(args: argparse.Namespace) -> int:
    _quiet_library_errors(args)
    config = load_or_explain(args)
    if config is None:
        return 2
    peer: PeerLike
    try:
        destination = config.peers.destination(args.destination)
        if destination.is_dicomweb:
            return _echo_dicomweb(destination, args.timeout)
        peer = dimse_peer(destination)
        label = f"{args.destination} ({peer.ae_title}@{peer.host}:{peer.port})"
    except KeyError:
        try:
            peer = _peer_from_text(args.destination, args.aet)
        except ValueError:
            known = ", ".join(d.name for d in config.destinations) or "none configured"
            print(f"error: {args.destination!r} is neither a destination name ({known}) nor HOST:PORT",
                  file=sys.stderr)
            return 2
        label = f"{peer.ae_title}@{peer.host}:{peer.port}"
    started = time.perf_counter()
    try:
        code = echo(peer, args.calling_aet or config.ae_title, timeout_s=args.timeout)
    except AssociationError as exc:
        print(f"C-ECHO to {label} failed: {exc}", file=sys.stderr)
        return 1
    print(f"C-ECHO to {label}: {status.describe(code)} in {time.perf_counter() - started:.3f} s")
    return 0 if status.is_success(code) else 1


def _echo_dicomweb(destination: Destination, timeout_s: float) -> int:
    """QIDO-RS ``GET {url}/studies?limit=1``: 200 (or 204, nothing found) means the root answers and
    takes the node's credentials and certificate checks; anything else is reported with its reason."""
    label = f"{destination.name} ({destination.url})"
    for warning in stow.start_warnings(destination):
        print(f"warning: {destination.name}: {warning}", file=sys.stderr)
    started = time.perf_counter()
    try:
        answer = stow.echo(destination, timeout_s=timeout_s)
    except stow.StowError as exc:
        print(f"DICOMweb echo (QIDO-RS) to {label} failed: {exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    if answer.reachable:
        print(f"DICOMweb echo (QIDO-RS) to {label}: {answer.describe()} in {elapsed:.3f} s")
        return 0
    print(f"DICOMweb echo (QIDO-RS) to {label} failed: {answer.describe()}", file=sys.stderr)
    return 1


def _send_peer(args: argparse.Namespace) -> tuple[Peer, str] | int:
    """The peer and our AE title for ``send``: HOST:PORT as given (TLS with ``--tls-ca``), else a
    configured DIMSE destination with its own TLS files, as the dispatcher reaches it. An int is
    the exit status of a usage error (already explained)."""
    try:
        host_port = _peer_from_text(args.to, args.aet)
    except ValueError:
        host_port = None
    if host_port is not None:
        if args.aet is None:
            print("error: --aet (the called AE title) is required with HOST:PORT", file=sys.stderr)
            return 2
        if (args.tls_cert is None) != (args.tls_key is None):
            print("error: --tls-cert and --tls-key go together", file=sys.stderr)
            return 2
        if args.tls_cert is not None and args.tls_ca is None:
            print("error: --tls-cert needs --tls-ca (the CA that signed the peer's certificate)", file=sys.stderr)
            return 2
        if args.tls_ca is not None:
            host_port = dataclasses.replace(host_port, tls=True, ca_certificates=args.tls_ca,
                                            certificate=args.tls_cert, private_key=args.tls_key)
        return host_port, args.calling_aet or "DICOM_NODE_SCU"
    if args.tls_ca is not None or args.tls_cert is not None or args.tls_key is not None:
        print("error: --tls-* go with HOST:PORT; a destination's TLS files are in the configuration", file=sys.stderr)
        return 2
    config = load_or_explain(args)
    if config is None:
        return 2
    try:
        destination = config.peers.destination(args.to)
    except KeyError:
        known = ", ".join(d.name for d in config.destinations) or "none configured"
        print(f"error: --to: {args.to!r} is neither a destination name ({known}) nor HOST:PORT", file=sys.stderr)
        return 2
    if destination.is_dicomweb:
        print(f"error: --to: {args.to!r} is a DICOMweb destination; send takes DIMSE peers "
              f"(`dicom-node echo {args.to}` checks it)", file=sys.stderr)
        return 2
    return dimse_peer(destination), args.calling_aet or config.ae_title


def _quiet_library_errors(args: argparse.Namespace) -> None:
    """These commands explain a failed association in one line of their own; pynetdicom also logs
    it at ERROR with a traceback (a peer that resets the connection, a TLS port spoken to in plain
    TCP), which reads like a crash. Kept with ``--log-level DEBUG``."""
    if str(getattr(args, "log_level", "") or "").upper() != "DEBUG":
        logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)


def run_send(args: argparse.Namespace) -> int:
    _quiet_library_errors(args)
    chosen = _send_peer(args)
    if isinstance(chosen, int):
        return chosen
    peer, calling_aet = chosen
    files: list[Path] = []
    for path in args.files:
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            print(f"error: {path} does not exist", file=sys.stderr)
            return 2
    started = time.perf_counter()
    try:
        outcomes = store_files(peer, files, calling_aet, timeout_s=args.timeout)
    except AssociationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    failed = 0
    for outcome in outcomes:
        print(f"{outcome.path}: {outcome.describe()}")
        failed += not outcome.stored
    elapsed = time.perf_counter() - started
    print(f"sent {len(outcomes) - failed} of {len(outcomes)} to {peer}{' over TLS' if peer.tls else ''} "
          f"in {elapsed:.2f} s")
    return 1 if failed else 0

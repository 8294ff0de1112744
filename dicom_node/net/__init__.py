"""The node's network side, shaped like pynetdicom: ``scp`` (receive), ``scu`` (send), ``status``
(named DIMSE and association statuses) and ``spool`` (the atomic writes intake and encoding rely on)."""

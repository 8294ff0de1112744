"""The DICOM result objects of a parsed photo: SEG (segments), SC (overlay) and SR (TID 1500).

Layout: ``codes`` (the one code table), ``options`` (how results are labelled; free of highdicom,
so the configuration can take its defaults from it), ``common`` (UIDs, patient/study copy,
algorithm identification), one module per object (``seg``, ``sc``, ``sr``), ``results`` (all
three in one call) and ``validate`` (dciodvfy). This face imports nothing: importing the options
must not load highdicom.
"""

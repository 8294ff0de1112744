"""dicom_node: a DICOM AI node that parses body photographs with M2FP and returns SEG, SC and SR."""

__version__ = "0.1.0"

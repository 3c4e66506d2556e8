"""metaseg: meta-learning semantic segmentation across a mix of datasets."""

__version__ = "0.1.0"

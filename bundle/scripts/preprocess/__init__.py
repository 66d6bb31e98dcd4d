"""Raw scans -> model-ready cases, one step a module: reading (`io`), N4 (`bias`), T2W -> T1C (`coregister`),
brain extraction (`brain`), T1C -> atlas (`atlas`), composed resampling and crop (`resample`), QC (`qc`), the
per-case driver (`workflow`) and inference on raw scans (`inference`). See docs/preprocessing.md."""
from .workflow import Chain, PreprocessError, load_chain, prepare_cases, run_preprocessing

__all__ = ["Chain", "PreprocessError", "load_chain", "prepare_cases", "run_preprocessing"]

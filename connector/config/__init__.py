"""Reading, interpolating and validating pipeline files."""

from .loader import LoadedFile, PipelineConfig, load_file, load_text
from .model import BatchPolicy, FileSpec, HttpSettings, PipelineSpec, PluginSpec, RetryPolicy

__all__ = [
    "BatchPolicy",
    "FileSpec",
    "HttpSettings",
    "LoadedFile",
    "PipelineConfig",
    "PipelineSpec",
    "PluginSpec",
    "RetryPolicy",
    "load_file",
    "load_text",
]

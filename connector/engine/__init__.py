"""The engine: runs pipelines from source through transforms to sink, with acks."""

from .pipeline import Pipeline, PipelineState
from .supervisor import Supervisor

__all__ = ["Pipeline", "PipelineState", "Supervisor"]

"""The pipeline: its config schemas, their resolution into explicit stages and checks, the
path-to-path steps the Prefect tasks wrap, the ablation's arms and report, the demo teacher."""

from slimmoe.pipeline.ablation_schema import AblationConfig, load_ablation_config
from slimmoe.pipeline.arms import check_ablation_inputs, plan_arms
from slimmoe.pipeline.resolve import check_config, check_inputs, expand_schedule, resolve_pipeline
from slimmoe.pipeline.schema import PipelineConfig, StageConfig, load_pipeline_config

__all__ = ["AblationConfig", "PipelineConfig", "StageConfig", "check_ablation_inputs", "check_config", "check_inputs",
           "expand_schedule", "load_ablation_config", "load_pipeline_config", "plan_arms", "resolve_pipeline"]

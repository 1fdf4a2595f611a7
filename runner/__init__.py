"""The shell: model runner (lifecycle and steps), batch preparation, sampler, scheduler,
the `LLM` facade and the CLI (`python -m runner`)."""

from runner.async_llm import AsyncLLM
from runner.llm import LLM
from runner.device.model_runner import ModelRunner
from runner.engine.outputs import CompletionOutput, RequestOutput
from runner.sampling_params import SamplingParams

__all__ = ["AsyncLLM", "LLM", "CompletionOutput", "ModelRunner", "RequestOutput", "SamplingParams"]

"""rlserve: a generation server for online RL training of language models."""

from rlserve.outputs import CompletionOutput, Logprob, RequestOutput
from rlserve.sampling import SamplingParams

__version__ = "0.1.0"

__all__ = ["LLM", "Client", "SamplingParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]


def __getattr__(name):
    # Lazy, so that `import rlserve` stays light (the client side does not need the engine).
    if name == "LLM":
        from rlserve.engine.llm import LLM
        return LLM
    if name == "Client":
        from rlserve.client.client import Client
        return Client
    raise AttributeError(name)

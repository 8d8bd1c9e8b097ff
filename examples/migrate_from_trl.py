"""Moving a TRL-era trainer from `trl vllm-serve` to rlserve: the import line is the change.

    rlserve serve --model Qwen/Qwen2.5-0.5B-Instruct        # instead of: trl vllm-serve --model ...

Everything below is the TRL `VLLMClient` usage, unchanged.
"""

# from trl.extras.vllm_client import VLLMClient          # before
from rlserve import Client as VLLMClient                  # after

from transformers import AutoModelForCausalLM


def main() -> None:
    client = VLLMClient(host="127.0.0.1", server_port=8000, connection_timeout=120)
    out = client.generate(["Hello, AI!", "Tell me a joke"], n=2, max_tokens=32, temperature=0.8)
    print(out["completion_ids"][0], out["logprobs"][0][:3])  # TRL's layout: [[logprob of the sampled token]]

    chat = client.chat([[{"role": "user", "content": "Say hi"}]], max_tokens=16)
    print(chat["completion_ids"])

    model = AutoModelForCausalLM.from_pretrained("Qwen/Qwen2.5-0.5B-Instruct").to("cuda")
    client.init_communicator(device="cuda")
    for name, param in model.named_parameters():  # TRL's per-tensor sequence
        client.update_named_param(name, param.data)
    client.reset_prefix_cache()
    client.update_model_params(model)  # or all at once, bucketed (rlserve)
    client.close_communicator()


if __name__ == "__main__":
    main()

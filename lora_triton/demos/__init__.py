"""Front doors that train: the end-to-end demo, the forgetting benchmark, and their data.

    end_to_end    ``lora-triton demo``: a small Llama quantized to NF4, LoRA injected, two
                  domains in turn with and without forgetting protection, adapter saved in
                  PEFT's format and reloaded
    forgetting    ``lora-triton forgetting``: naive LoRA vs ContinualLoRA vs per-task adapters
                  (oracle) over three domains in several orders and fresh seeds
    text_domains  the domains (code, prose, arithmetic) built from text any Python install ships

Nothing is imported here: each command imports its module when it runs.
"""

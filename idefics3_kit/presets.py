"""Named configurations with the real numbers of released checkpoints, and a tiny one.

Numbers from ../shared/reference/idefics3-reference.md §4 (the checkpoints' config.json):
HuggingFaceM4/Idefics3-8B-Llama3, HuggingFaceTB/SmolVLM-Instruct and
HuggingFaceTB/SmolVLM-256M-Instruct. Plain data (the fields of each part's config), so this
module imports nothing: ``VLMConfig.preset(name)`` builds them.
"""

IDEFICS3_8B = {
    "vision": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
               "image_size": 364, "patch_size": 14},
    "connector": {"scale_factor": 2},
    "decoder": {"vocab_size": 128259, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0,
                "max_position_embeddings": 131072,
                "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                 "original_max_position_embeddings": 8192},
                "pad_token_id": 128002, "bos_token_id": 128000, "eos_token_id": 128001},
    "image_token_id": 128257,
}

SMOLVLM_INSTRUCT = {
    "vision": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
               "image_size": 384, "patch_size": 14},
    "connector": {"scale_factor": 3},
    "decoder": {"vocab_size": 49155, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 24,
                "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 64, "rope_theta": 273768.0,
                "max_position_embeddings": 16384},
    "image_token_id": 49153,
}

SMOLVLM_256M = {
    "vision": {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "image_size": 512, "patch_size": 16},
    "connector": {"scale_factor": 4},
    "decoder": {"vocab_size": 49280, "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
                "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64, "rope_theta": 100000.0,
                "max_position_embeddings": 8192, "pad_token_id": 2, "bos_token_id": 1, "eos_token_id": 49279},
    "image_token_id": 49190,
}

# A few-hundred-thousand-parameter model with SmolVLM-256M's geometry ratios, for demos and tests.
TINY = {
    "vision": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
               "image_size": 64, "patch_size": 16},
    "connector": {"scale_factor": 2},
    "decoder": {"vocab_size": 512, "hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 2,
                "num_attention_heads": 6, "num_key_value_heads": 2, "rope_theta": 10000.0,
                "max_position_embeddings": 2048, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2},
    "image_token_id": 300,
}

PRESETS = {
    "idefics3-8b": IDEFICS3_8B,
    "smolvlm-instruct": SMOLVLM_INSTRUCT,
    "smolvlm-256m": SMOLVLM_256M,
    "tiny": TINY,
}

"""DeepSpeed recipes (JSON), shipped with the package: refer to them by name (`bert_base_seq512_lamb_bf16`) or path."""

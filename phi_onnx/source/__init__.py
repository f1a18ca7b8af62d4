"""Where weights come from: short names (`models`), the hub, cache or a folder (`hub`), the safetensors reader
(`checkpoint`) and the one normaliser of config.json (`config`)."""

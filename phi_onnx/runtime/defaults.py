"""The scheduler's defaults, in a module that imports nothing: `phi_onnx.serve.config.ServeConfig` reads them,
and the CLI reads ServeConfig for its options' defaults without loading numpy or ONNX Runtime."""

#: KV slots (requests decoded together) and requests waiting beyond them.
MAX_BATCH = 8
MAX_QUEUE = 64
#: While streams decode, a step (admission, prompt pieces, decode) takes about 1 + this many decode steps at the
#: pool's occupancy; a piece may run up to the scheduler's SLACK over its budget (phi_onnx.runtime.scheduler).
STALL_FACTOR = 1.25
#: Most prompt tokens a cohort (cold prompts that arrived together while nothing streamed) computes before its
#: streams start decoding together (about 14 s at 150 tokens/s); 0: each stream starts as soon as its prompt is in.
COHORT_TOKENS = 2048

"""The scheduler's defaults, in a module that imports nothing: `phi_onnx.serve.config.ServeConfig` reads them,
and the CLI reads ServeConfig for its options' defaults without loading numpy or ONNX Runtime."""

#: KV slots (requests decoded together) and requests waiting beyond them.
MAX_BATCH = 8
MAX_QUEUE = 64
#: While streams decode, a step (admission, prompt pieces, decode) takes about 1 + this many decode steps at the
#: pool's occupancy; a piece may run up to the scheduler's SLACK over its budget (phi_onnx.runtime.scheduler).
STALL_FACTOR = 1.25

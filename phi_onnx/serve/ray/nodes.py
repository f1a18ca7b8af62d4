"""Checks that an export is usable where the replicas will run (here, or on every node of a cluster)."""

from __future__ import annotations

import os
from pathlib import Path

from phi_onnx.errors import OptionsError, PhiOnnxError
from phi_onnx.serve.ray.options import require_ray


def check_export(folder: str | os.PathLike[str]) -> Path:
    """Fail before anything starts when `folder` is not an export (read as the runtime reads it)."""
    from phi_onnx.runtime.folder import read_folder

    return read_folder(folder).path


def check_export_on_nodes(folder: str | os.PathLike[str], *, gpus_per_replica: float = 0.0) -> None:
    """Check `folder` on every alive node that could host a replica (one tiny Ray task per node).

    Raises:
        OptionsError: naming each node where the folder is missing or not an export.
    """
    ray = require_ray()
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def check(path: str) -> str | None:
        try:
            check_export(path)
        except PhiOnnxError as error:
            return error.message
        return None

    resource = "GPU" if gpus_per_replica > 0 else "CPU"
    nodes = [node for node in ray.nodes() if node["Alive"] and node["Resources"].get(resource, 0) > 0]
    futures = {node["NodeManagerAddress"]: check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
        node["NodeID"], soft=False)).remote(str(folder)) for node in nodes}
    problems = [f"{address}: {message}" for address, message in
                zip(futures, ray.get(list(futures.values()), timeout=120), strict=True) if message]
    if problems:
        raise OptionsError(f"The export {folder} is not usable on {len(problems)} of {len(nodes)} node(s): "
                           + "; ".join(problems),
                           hint="Put the export at the same path on every node (or on a shared file system).")

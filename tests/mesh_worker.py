"""Runs training jobs in one process for tests/test_sharding.py, which starts it with a chosen device count.

python tests/mesh_worker.py JOBS_JSON: JOBS_JSON is a list of {"workdir", "data_dir", "mesh": [data, fsdp, tensor],
"max_steps", "out", optional "model": {field: value}, "optim": {field: value}, "hlo": path}; each job trains the test
config (or with "hlo" writes its compiled step's HLO there) and saves its final params and per-step losses to "out",
and each parameter's sharding (its PartitionSpec as a list) to "out".specs.json.
Multi-process: pass --coordinator/--num_processes/--process_id after the JSON and each process runs the same jobs.
"""
import json
import sys

import jax
import numpy as np


def test_config(data_dir, mesh, max_steps, model=None, optim=None):
    from configs import tiny
    c = tiny.get_config()
    c.model.n_head, c.model.n_embd = 4, 64  # heads divisible by a tensor axis of 4
    c.model.update(model or {})
    c.optim.update(optim or {})
    c.data.dir = data_dir
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    c.max_steps, c.optim.decay_steps = max_steps, 12
    c.eval_every, c.log_every, c.sample_tokens, c.eval_iters = 100, 1, 0, 2
    return c


def run(job):
    from jaxgpt import train
    config = test_config(job["data_dir"], job["mesh"], job["max_steps"], job.get("model"), job.get("optim"))
    if job.get("hlo"):  # the compiled training step's HLO text, not a run
        write_hlo(config, job["hlo"])
        return
    state = train.train(config, job["workdir"])
    if jax.process_index() == 0:
        flat = {jax.tree_util.keystr(k): np.asarray(jax.device_get(v))
                for k, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}
        with open(f"{job['workdir']}/metrics.jsonl") as f:
            losses = [json.loads(line)["loss"] for line in f if '"loss"' in line]
        np.savez(job["out"], losses=np.array(losses), **flat)
        specs = {jax.tree_util.keystr(k): list(v.sharding.spec) + [None] * (v.ndim - len(v.sharding.spec))
                 for k, v in jax.tree_util.tree_flatten_with_path(state.params)[0]}
        with open(f"{job['out']}.specs.json", "w") as f:
            json.dump(specs, f)


def write_hlo(config, path):
    import jax.numpy as jnp

    from jaxgpt import loader, sharding, step
    mesh = sharding.make_mesh(config.mesh)
    steps = step.make_steps(config, loader.model_config(config, 65), mesh)
    shape = (1, 1, config.batch_size, config.model.block_size)
    batch = {k: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=sharding.batch_sharding(mesh, 4, 2))
             for k in ("inputs", "targets")}
    with open(path, "w") as f:
        f.write(steps.train_steps.lower(steps.abstract_state, batch).compile().as_text())


def main(argv):
    jobs = json.loads(argv[1])
    if len(argv) > 2:
        coordinator, n, i = argv[2:5]
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=int(n), process_id=int(i),
                                   heartbeat_timeout_seconds=10)
    for job in jobs:
        run(job)


if __name__ == "__main__":
    main(sys.argv)

"""Multi-rank stage jobs on torch.distributed (docs/distributed.md).

A job whose settings ask for N > 1 ranks (`distributed.nproc_per_node`, or a Ray job's `gpus_per_job`) is launched
by `launch`: the executor's process runs `torchrun --standalone --nproc-per-node N -m chaintune.distributed OUT JOB`
and waits for it. Each rank rebuilds the job from the run directory (`sweep/points.json`, written before any job
runs) and runs the same `StageExecutor` with a `Ranks`:

- training: every micro-batch is split over the ranks (`Ranks.mine`); the loss is summed over the global batch's
  answer tokens, so the gradient — and the loss curve — is that of one process with the whole batch. `ddp`: a full
  replica per rank (DistributedDataParallel); `fsdp`: FSDP2 `fully_shard` per decoder layer and at the root
  (weights, gradients and AdamW moments sharded), bf16 compute with fp32 master weights and reductions on CUDA.
  After training the weights are gathered into a plain model on every rank.
- evaluation: the single-process batches are dealt round robin over the ranks and the scores gathered, so each
  question is scored in exactly the batch it would be in alone (identical scores).
- curvature: micro-batches are dealt over the ranks. `ddp`: the Hessian-vector products are all-reduced and every
  rank holds whole vectors; `fsdp`: the model is sharded again (`shard_for_curvature`) and every vector is the rank's
  shard of the parameters (`ShardedHessianOperator`: finite-difference products, inner products summed over ranks).
- rank 0 alone writes (records, checkpoints, the mid-stage resume state); every rank reads the resume state.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch

from chaintune.errors import ChaintuneError

T = TypeVar("T")
WORKER = ["-m", "chaintune.distributed"]  # what torchrun starts on each rank (tests put a fault-injecting script here)
ERROR_MARK = "chaintune-error: "  # a rank's one-line ChaintuneError, passed back through stderr


@dataclass(frozen=True)
class Ranks:
    """This process's place in a multi-rank job."""

    rank: int
    world: int
    strategy: str  # "ddp" | "fsdp"
    device: torch.device

    @property
    def writer(self) -> bool:
        """Rank 0 writes every file of the job."""
        return self.rank == 0

    def mine(self, items: Sequence[T]) -> list[T]:
        """This rank's share of `items`: every world-th one, from its rank on."""
        return list(items[self.rank::self.world])

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sum over the ranks (float64)."""
        import torch.distributed as dist

        total = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device)
        dist.all_reduce(total)
        return total.tolist()

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) `tensor` in place; every rank ends with the same values."""
        import torch.distributed as dist

        dist.all_reduce(tensor)
        return tensor

    def gather(self, items: list[Any]) -> list[Any]:
        """The concatenation of every rank's `items` (rank order), on every rank."""
        import torch.distributed as dist

        parts: list[Any] = [None] * self.world
        dist.all_gather_object(parts, items)
        return [x for part in parts for x in part]

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    @property
    def _comm_device(self) -> torch.device:
        import torch.distributed as dist

        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def init_ranks(strategy: str, backend: str, device: torch.device) -> Ranks:
    """Join the process group torchrun set up (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the environment)."""
    import torch.distributed as dist

    local = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None)
    return Ranks(dist.get_rank(), dist.get_world_size(), strategy, device)


# --------------------------------------------------------------------------------------------------------- training
class AnswerLogits(torch.nn.Module):
    """The curvature's forward as one module call (what FSDP hooks): (fp32 answer-token logits, their targets)."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor):
        from chaintune.train import answer_logits

        return answer_logits(self.lm, ids, labels, mask)

    def get_base_model(self) -> torch.nn.Module:
        """The Hugging Face model inside (whose attention `curvature.eager_attention` switches)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm


class AnswerLoss(AnswerLogits):
    """The training forward as one module call (what DDP and FSDP hook): (summed answer-token loss, token count)."""

    def forward(self, ids: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor):
        from chaintune.train import answer_loss_sum

        return answer_loss_sum(self.lm, ids, labels, mask)


def wrap_for_training(model: torch.nn.Module, ranks: Ranks) -> torch.nn.Module:
    """`model`'s loss module under the ranks' strategy. DDP shares `model`'s parameters; FSDP turns them into sharded
    DTensors in place (`gather_weights` makes a plain model again)."""
    loss = AnswerLoss(model)
    if ranks.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [ranks.device.index] if ranks.device.type == "cuda" else None
        return DistributedDataParallel(loss, device_ids=ids)
    from torch.distributed.fsdp import MixedPrecisionPolicy

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if ranks.device.type == "cuda" else MixedPrecisionPolicy()
    return _fully_shard(loss, model, policy)


def _fully_shard(root: torch.nn.Module, model: torch.nn.Module, policy) -> torch.nn.Module:
    """FSDP2 `fully_shard` of each decoder layer of `model` (its `_no_split_modules`), then of `root`, which holds
    `model` and whose forward is the one module call that FSDP hooks."""
    from torch.distributed.fsdp import fully_shard

    blocks = set(getattr(model, "_no_split_modules", None) or [])
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mp_policy=policy)
    return fully_shard(root, mp_policy=policy)


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded DTensor (a collective: every rank calls it); any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def reshard(module: torch.nn.Module) -> None:
    """Free the gathered parameters of every FSDP2 unit of `module` (no-op without FSDP). FSDP2 keeps the root's
    parameters gathered after a forward that no backward follows (a validation pass): `named_parameters()` then
    yields those temporary whole tensors, and a write into them (select_best's restore) is lost at the next
    reshard. Call this before reading or writing sharded parameters outside a training step."""
    from torch.distributed.fsdp import FSDPModule

    for unit in module.modules():
        if isinstance(unit, FSDPModule):
            unit.reshard()


def shard_like(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """`full` placed like `param`: this rank's shard (a DTensor) when `param` is sharded, else `full` itself."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(param, DTensor):
        return full
    return distribute_tensor(full.to(param.device_mesh.device_type), param.device_mesh, param.placements)


def gather_weights(model: torch.nn.Module, ranks: Ranks) -> torch.nn.Module:
    """A plain (unsharded) model with the trained weights on every rank: `model` itself under DDP; under FSDP a new
    model of the same config (a LoRA model: the same adapters attached), loaded with the gathered weights (tied
    weights tied again)."""
    if ranks.strategy == "ddp":
        return model
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    state = {name: full_tensor(p.detach()).to(ranks.device) for name, p in model.state_dict().items()}
    adapters = getattr(model, "peft_config", None)  # a PeftModel: {adapter name: LoraConfig}
    with init_empty_weights():  # parameters on the meta device, buffers (rotary frequencies) real
        plain = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
        if adapters:
            from peft import get_peft_model

            plain = get_peft_model(plain, adapters["default"])
    plain.load_state_dict(state, assign=True, strict=False)
    plain.tie_weights()
    empty = [name for name, p in plain.named_parameters() if p.is_meta]
    if empty:
        raise RuntimeError(f"gathering the sharded weights left {len(empty)} parameters unloaded (e.g. {empty[0]})")
    return plain.to(ranks.device)


# -------------------------------------------------------------------------------------------------------- curvature
FD_STEP = 1e-4  # ε·‖v‖ / max(‖θ‖, 1) of ShardedHessianOperator's finite differences (docs/distributed.md: its error)


def shard_for_curvature(model: torch.nn.Module) -> torch.nn.Module:
    """`model` (a plain model: full, or with LoRA adapters) sharded for `ShardedHessianOperator`: FSDP2 per decoder
    layer and at an `AnswerLogits` root, in fp32 (curvature computes in fp32 on every device). Its parameters become
    this rank's shards in place: `gather_weights` of the result's `.lm` makes a plain model again."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    return _fully_shard(AnswerLogits(model), model, MixedPrecisionPolicy())


class ShardedHessianOperator:
    """v ↦ H v for the mean answer-token cross-entropy over `examples`, w.r.t. the trainable parameters of a model
    sharded by `shard_for_curvature`, with every vector this rank's shards of those parameters (flattened and
    concatenated in parameter order: `dim` long; `size` is the whole length) and inner products summed over the
    ranks (`dot`). What `curvature.measure_curvature` needs of `HessianOperator`, for `fsdp` jobs.

    FSDP2 reduce-scatters gradients without an autograd graph, so there is no double backward through it (measured:
    docs/distributed.md). A call is the central difference of two sharded gradients, H v ≈ (∇L(θ + εv) − ∇L(θ − εv))
    / 2ε with ε = FD_STEP·max(‖θ‖, 1)/‖v‖: the perturbation is written into the local shards, which are copied back
    from a saved copy afterwards (exactly θ again). Micro-batches are dealt round robin over the ranks; every rank
    runs the same number of forward and backward passes (a stand-in at weight 0 when it has no batch left), as
    FSDP's collectives need. No graph is kept (`graph_budget` is ignored). Use it in eval mode inside
    `curvature.eager_attention(model)`."""

    def __init__(self, model, tokenizer, examples, micro_batch: int = 8, max_length: int = 512,
                 graph_budget: float = 0, ranks: Ranks | None = None, parts: Sequence[int] | None = None):
        from torch.distributed.fsdp import FSDPModule

        from chaintune.curvature import answer_batches

        if ranks is None or not isinstance(model, FSDPModule):
            raise ValueError("ShardedHessianOperator needs the ranks and a model from shard_for_curvature")
        self.model, self.ranks, self.device = model, ranks, ranks.device
        reshard(model)
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise ValueError("the model has no trainable parameters")
        self.sizes = [p.to_local().numel() for p in self.params]
        self.dim = sum(self.sizes)
        self.size = int(ranks.sum([self.dim])[0])
        self.theta_norm = math.sqrt(ranks.sum([sum(float(p.to_local().detach().double().square().sum())
                                                   for p in self.params)])[0])
        self.batches, self.batch_part, self.part_tokens = answer_batches(tokenizer, examples, micro_batch, max_length,
                                                                         self.device, parts)
        self.n_tokens = sum(self.part_tokens)
        self.calls = 0
        self._loss: float | None = None

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """The inner product of two sharded vectors: the ranks' local products summed (every rank gets it)."""
        return self.ranks.sum([float(torch.dot(a, b))])[0]

    def vector_seed(self, seed: int) -> int:
        """The seed of this rank's shard of a random vector (independent shards)."""
        from chaintune.tasks.splits import stable_seed

        return stable_seed("vector-shard", seed, self.ranks.rank)

    def loss(self) -> float:
        """Mean answer-token loss over the examples (from `start_vector`'s forward passes when it ran)."""
        if self._loss is None:
            self._forward_all(None)
        return self._loss

    def _forward_all(self, generator: torch.Generator | None) -> list[torch.Tensor]:
        """Every micro-batch's forward on every rank (no gradient), in the order of one process: records the loss
        and, with `generator`, draws each answer token's label from the model's prediction (what
        `HessianOperator.start_vector` draws)."""
        total, draws = 0.0, []
        with torch.no_grad():
            for batch in self.batches:
                logits, target = self.model(*batch)
                total += torch.nn.functional.cross_entropy(logits, target, reduction="sum").item()
                if generator is not None:
                    draws.append(torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator)[:, 0]
                                 .to(self.device))
        reshard(self.model)  # FSDP2 keeps the root's parameters gathered after a forward without backward
        self._loss = total / self.n_tokens
        return draws

    def _gradient(self, loss_of, indices: Sequence[int] | None = None) -> torch.Tensor:
        """This rank's flat shard of ∇ Σ_i loss_of(i, logits_i, targets_i) over the micro-batches `indices` (default
        all; fp32)."""
        indices = list(range(len(self.batches))) if indices is None else list(indices)
        n, world = len(indices), self.ranks.world
        for p in self.params:
            p.grad = None
        for r in range(math.ceil(n / world)):
            j = r * world + self.ranks.rank
            weight = float(world) if j < n else 0.0  # ×N: FSDP averages gradients over ranks; 0: a stand-in
            i = indices[min(j, n - 1)]
            (loss_of(i, *self.model(*self.batches[i])) * weight).backward()
        flat = torch.cat([(p.grad.to_local() if p.grad is not None else torch.zeros_like(p.to_local())).reshape(-1)
                          for p in self.params])
        for p in self.params:
            p.grad = None
        return flat

    def start_vector(self, seed: int) -> torch.Tensor:
        """`HessianOperator.start_vector` (the Fisher start vector, the same label draws), this rank's shard."""
        from chaintune.curvature import _start
        from chaintune.tasks.splits import stable_seed

        draws = self._forward_all(torch.Generator().manual_seed(stable_seed("fisher-start", seed)))
        start = self._gradient(lambda i, logits, _: torch.nn.functional.cross_entropy(logits, draws[i],
                                                                                      reduction="sum"))
        if self.dot(start, start) > 0:
            return _start(start, self.dim, seed, "lanczos", self.device, self.dot)
        return _start(None, self.dim, self.vector_seed(seed), "lanczos", self.device, self.dot)

    def __call__(self, vector: torch.Tensor) -> torch.Tensor:
        """H·vector for this rank's flat fp32 shard of a vector (a new tensor: this rank's shard of H·vector)."""
        self.calls += 1
        return self._product(vector, range(len(self.batches)))

    def quadratic_forms(self, vector: torch.Tensor) -> list[float]:
        """`HessianOperator.quadratic_forms`: each part's Rayleigh quotient vᵀH_k v / vᵀv (one pass)."""
        from chaintune.curvature import part_quotients

        return part_quotients(self, vector, lambda part: self._product(
            vector, [i for i, k in enumerate(self.batch_part) if k == part]))

    def _product(self, vector: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
        """This rank's shard of Σ over the micro-batches `indices` of their share of H·vector."""
        from chaintune.curvature import _require_eager

        _require_eager(self.model)
        reshard(self.model)
        norm = math.sqrt(self.dot(vector, vector))
        if norm == 0:
            return torch.zeros_like(vector)
        eps = FD_STEP * max(self.theta_norm, 1.0) / norm
        saved = [p.to_local().detach().clone() for p in self.params]
        def mean_loss(_, logits, target):
            return torch.nn.functional.cross_entropy(logits, target, reduction="sum") / self.n_tokens

        grads = []
        try:
            for sign in (1.0, -1.0):
                with torch.no_grad():
                    for p, theta, v in zip(self.params, saved, torch.split(vector, self.sizes)):
                        p.to_local().copy_(theta).add_(v.view_as(theta), alpha=sign * eps)
                grads.append(self._gradient(mean_loss, indices))
        finally:
            with torch.no_grad():
                for p, theta in zip(self.params, saved):
                    p.to_local().copy_(theta)
        return grads[0].sub_(grads[1]).div_(2 * eps)


# --------------------------------------------------------------------------------------------------------- launching
def launch(job, nproc: int) -> dict[str, Any]:
    """Run `job` as `nproc` ranks under torchrun and wait; {"seconds": wall time}. A rank's ChaintuneError comes back
    as that error (not retried); any other failure (a crash, a killed rank) as a RuntimeError (retried)."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               *WORKER, job.output_dir, str(job.id)]
    error = None
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True, errors="replace") as proc:
        assert proc.stderr is not None
        for line in proc.stderr:
            if line.startswith(ERROR_MARK):
                error = json.loads(line[len(ERROR_MARK):])
            else:
                sys.stderr.write(line)
    if error is not None:
        raise ChaintuneError(*error)
    if proc.returncode != 0:
        raise RuntimeError(f"the {nproc} ranks of {job.node.dirname} exited with code {proc.returncode} (a rank "
                           "crashed or was killed; its log is above)")
    return {"seconds": time.perf_counter() - started}


def job_from_rundir(output_dir: str, job_id: str):
    """The job `job_id` (str(JobId)) of the experiment stored in `output_dir`, rebuilt as the scheduler built it."""
    from chaintune.config import validate_config
    from chaintune.plan import JobId, Point, make_plan
    from chaintune.rundir import PointRecord, RunDir
    from chaintune.io import read_json

    out = RunDir(output_dir)
    records = [PointRecord.model_validate(p) for p in read_json(out.points_path)]
    points = [Point(r.label, r.overrides, validate_config(r.config, str(out.points_path))) for r in records]
    node, _, point = job_id.partition("@")
    return make_plan(points).jobs[JobId(node, int(point) if point else None)]


def main(argv: Sequence[str] | None = None) -> int:
    """One rank of a stage job: `python -m chaintune.distributed OUTPUT_DIR JOB_ID` under torchrun."""
    import functools

    import torch.distributed as dist

    from chaintune.models import pick_device
    from chaintune.stage import StageExecutor
    from chaintune.tasks import register_user_tasks
    from chaintune.weights import WeightCache

    output_dir, job_id = argv if argv is not None else sys.argv[1:]
    job = job_from_rundir(output_dir, job_id)
    settings = job.settings
    ranks = init_ranks(settings.distributed.strategy, settings.distributed.backend, pick_device(settings.device))
    try:
        register_user_tasks(list(settings.custom_tasks))
        from chaintune.rundir import RunDir

        device = str(ranks.device)
        cache = WeightCache(RunDir(job.output_dir), settings.model, device, settings.trust_remote_code)
        echo = functools.partial(print, flush=True) if ranks.writer else (lambda _: None)
        StageExecutor(cache, echo=echo, ranks=ranks).run(job)
    except ChaintuneError as exc:
        if ranks.writer:
            print(ERROR_MARK + json.dumps([exc.problem, exc.fix]), file=sys.stderr, flush=True)
        return 2
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Tensor-parallel layers: the sharded replacements `apply_tensor_parallel` puts into a model.

Each is built from the dense layer it replaces (`from_dense`), keeping this rank's slice of the
dense weights, so the weights do not depend on the tensor-parallel degree: a model initialized
whole with a seed and then split holds, over all ranks, exactly the dense model's weights.

Sharded parameters carry two attributes: `tensor_model_parallel = True` (DeepSpeed counts them on
every rank in the gradient norm, replicated ones on TP rank 0 only) and `partition_dim`, the
dimension split into equal chunks in rank order (checkpoints use it to reassemble the whole
tensor). Parameters whose gradient is a partial sum over TP ranks (norms and biases between the
regions under sequence parallelism) carry `sequence_parallel = True`.

Shape legend: B batch, T positions, N = B*T, D d_model, V vocabulary, Vl = V / tp (this rank's
vocabulary rows), O/I output/input features, n = tp.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pretrain.parallel.tp_comm import reduce_from_tp, reduce_scatter_seq


def shard(t: Tensor, dim: int, rank: int, n: int) -> Tensor:
    """Rank `rank`'s chunk of `t` split into `n` equal parts along `dim` (a new tensor)."""
    if t.size(dim) % n:
        raise ValueError(f"dimension {dim} of size {t.size(dim)} does not split into {n} parts")
    return t.detach().chunk(n, dim=dim)[rank].clone()


def sharded_parameter(t: Tensor, dim: int, rank: int, n: int) -> nn.Parameter:
    p = nn.Parameter(shard(t, dim, rank, n))
    p.tensor_model_parallel = True
    p.partition_dim = dim
    return p


def _group_rank(group) -> tuple[int, int]:
    return (0, 1) if group is None else (dist.get_rank(group), dist.get_world_size(group))


class ColumnParallelLinear(nn.Module):
    """y_local = x W_l^T + b_l with W_l = this rank's rows of W [O, I] (its output features).

    No communication: the input must already be identical on every TP rank (the region was
    entered with copy_to_tp or gather_seq), and the output is this rank's O/n features.
    """

    plain_linear = True  # forward is F.linear(x, weight, bias): MultiHeadAttention may fuse it

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, tp: int) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias  # [O/n, I], [O/n]
        self.out_features, self.in_features = weight.shape
        self.full_out_features = self.out_features * tp

    @classmethod
    def from_dense(cls, linear: nn.Linear, group, weight: nn.Parameter | None = None):
        """`weight`: an already sharded Parameter to use (tied embeddings share theirs)."""
        rank, n = _group_rank(group)
        w = weight if weight is not None else sharded_parameter(linear.weight, 0, rank, n)
        b = None if linear.bias is None else sharded_parameter(linear.bias, 0, rank, n)
        return cls(w, b, n)

    def forward(self, x_BTI: Tensor) -> Tensor:
        return F.linear(x_BTI, self.weight, self.bias)  # [B, T, O/n]

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features} of {self.full_out_features}, "
                f"bias={self.bias is not None}")


class RowParallelLinear(nn.Module):
    """y = sum over ranks of x_r W_r^T, then + b, with W_r = this rank's columns of W [O, I].

    The input is this rank's I/n features (the output of the region's column-parallel layers);
    the partial products are summed over TP ranks: an all-reduce, or under sequence
    parallelism a reduce-scatter that leaves each rank its T/n positions. The bias is whole on
    every rank and added once, after the sum.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, group,
                 sequence_parallel: bool) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias  # [O, I/n], [O]
        self.out_features, self.in_features = weight.shape
        self.group, self.sequence_parallel = group, sequence_parallel

    @classmethod
    def from_dense(cls, linear: nn.Linear, group, sequence_parallel: bool = False):
        rank, n = _group_rank(group)
        w = sharded_parameter(linear.weight, 1, rank, n)
        b = None
        if linear.bias is not None:
            b = nn.Parameter(linear.bias.detach().clone())
            b.sequence_parallel = sequence_parallel
        return cls(w, b, group, sequence_parallel)

    def forward(self, x_BTI: Tensor) -> Tensor:
        partial_BTO = F.linear(x_BTI, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_seq(partial_BTO, self.group)  # [B, T/n, O]
        else:
            y = reduce_from_tp(partial_BTO, self.group)  # [B, T, O]
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in={self.in_features} (split), out={self.out_features}, "
                f"bias={self.bias is not None}, sequence_parallel={self.sequence_parallel}")


class VocabParallelEmbedding(nn.Module):
    """Token embedding whose rows (the vocabulary) are split: rank r holds ids
    [r*V/n, (r+1)*V/n). Each rank looks up the ids it holds, writes zeros for the others, and an
    all-reduce adds the ranks' results, so every rank ends with the whole [B, T, D]."""

    def __init__(self, weight: nn.Parameter, group) -> None:
        super().__init__()
        self.weight = weight  # [Vl, D]
        rank, n = _group_rank(group)
        self.group = group
        self.num_embeddings = weight.size(0) * n
        self.embedding_dim = weight.size(1)
        self.vocab_start = rank * weight.size(0)

    @classmethod
    def from_dense(cls, emb: nn.Embedding, group):
        rank, n = _group_rank(group)
        return cls(sharded_parameter(emb.weight, 0, rank, n), group)

    def forward(self, ids_BT: Tensor) -> Tensor:
        local_BT = ids_BT - self.vocab_start
        outside_BT = (local_BT < 0) | (local_BT >= self.weight.size(0))
        out_BTD = F.embedding(local_BT.masked_fill(outside_BT, 0), self.weight)
        out_BTD = out_BTD.masked_fill(outside_BT.unsqueeze(-1), 0.0)
        return reduce_from_tp(out_BTD, self.group)

    def extra_repr(self) -> str:
        return (f"rows {self.vocab_start}..{self.vocab_start + self.weight.size(0)} of "
                f"{self.num_embeddings}, dim={self.embedding_dim}")


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-position cross-entropy from vocabulary-split logits, without gathering them.

    loss_i = log sum_v exp(z_iv) - z_i,t(i), computed from three all-reduces of [N] vectors: the
    max over the vocabulary (for stability), the sum of exponentials, and the target logit (held
    by one rank, zero elsewhere). The gradient is softmax - onehot(target), local to each rank.
    """

    @staticmethod
    def forward(ctx, logits_NVl: Tensor, targets_N: Tensor, vocab_start: int, group,
                ignore_index: int) -> Tensor:
        max_N = logits_NVl.max(dim=-1).values
        dist.all_reduce(max_N, op=dist.ReduceOp.MAX, group=group)
        shifted_NVl = logits_NVl - max_N.unsqueeze(-1)
        exp_NVl = shifted_NVl.exp()
        sum_exp_N = exp_NVl.sum(dim=-1)
        dist.all_reduce(sum_exp_N, group=group)

        Vl = logits_NVl.size(-1)
        local_N = targets_N - vocab_start
        valid_N = targets_N != ignore_index
        here_N = (local_N >= 0) & (local_N < Vl) & valid_N
        idx_N = local_N.clamp(0, Vl - 1)
        target_logit_N = shifted_NVl.gather(-1, idx_N.unsqueeze(-1)).squeeze(-1) * here_N
        dist.all_reduce(target_logit_N, group=group)

        loss_N = (sum_exp_N.log() - target_logit_N) * valid_N
        softmax_NVl = exp_NVl.div_(sum_exp_N.unsqueeze(-1))
        ctx.save_for_backward(softmax_NVl, idx_N, here_N, valid_N)
        return loss_N

    @staticmethod
    def backward(ctx, grad_N: Tensor):
        softmax_NVl, idx_N, here_N, valid_N = ctx.saved_tensors
        grad_NVl = softmax_NVl.clone()
        rows = torch.arange(grad_NVl.size(0), device=grad_NVl.device)
        grad_NVl[rows, idx_N] -= here_N.to(grad_NVl.dtype)
        grad_NVl.mul_((grad_N * valid_N).unsqueeze(-1))
        return grad_NVl, None, None, None, None


class VocabParallelCrossEntropy(nn.Module):
    """Drop-in for `LMCrossEntropy` on vocabulary-split logits [B, T, V/n]: mean cross-entropy
    (fp32) over targets != ignore_index and their count, equal on every TP rank."""

    def __init__(self, group, vocab_per_rank: int) -> None:
        super().__init__()
        rank, _ = _group_rank(group)
        self.group, self.vocab_start = group, rank * vocab_per_rank

    def forward(self, logits_BTVl: Tensor, targets_BT: Tensor,
                ignore_index: int = -100) -> tuple[Tensor, Tensor]:
        if targets_BT.shape != logits_BTVl.shape[:-1]:
            raise ValueError(f"targets have shape {tuple(targets_BT.shape)}, expected "
                             f"{tuple(logits_BTVl.shape[:-1])}")
        Vl = logits_BTVl.size(-1)
        loss_N = _VocabParallelCrossEntropy.apply(
            logits_BTVl.reshape(-1, Vl).float(), targets_BT.reshape(-1), self.vocab_start,
            self.group, ignore_index)
        n_targets = (targets_BT != ignore_index).sum()
        return loss_N.sum() / n_targets.clamp(min=1), n_targets

    @torch.no_grad()
    def predictions(self, logits_NVl: Tensor) -> Tensor:
        """The argmax over the whole vocabulary of vocabulary-split logits (the first of equal
        maxima, as torch.argmax), equal on every TP rank: two all-reduces of [N] vectors."""
        max_N, idx_N = logits_NVl.float().max(dim=-1)
        best_N = max_N.clone()
        dist.all_reduce(best_N, op=dist.ReduceOp.MAX, group=self.group)
        # ranks whose maximum is the best propose their index; the smallest proposal wins
        proposal_N = torch.where(max_N == best_N, idx_N + self.vocab_start,
                                 torch.iinfo(torch.long).max)
        dist.all_reduce(proposal_N, op=dist.ReduceOp.MIN, group=self.group)
        return proposal_N


# ----------------------------------------------------------------------------- randomness


class TensorParallelRNG:
    """Forward hooks that give a module (dropout on split heads or on sequence shards) a random
    stream of its own on each TP rank, while the default stream stays identical across the TP
    group (dropout on replicated activations must draw the same mask on every rank).

    Before the module runs, one seed is drawn from the default stream (the same draw on every
    TP rank) and mixed with the TP rank; the module runs under that seed; afterwards the default
    stream is put back. Activation checkpointing restores the default stream before it
    recomputes a block, so the recomputation draws the same seed and the same masks.
    """

    _MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: distinct ranks get unrelated seeds

    def __init__(self, tp_rank: int) -> None:
        self.tp_rank = tp_rank
        self._saved: list[tuple] = []

    def attach(self, module: nn.Module) -> None:
        module.register_forward_pre_hook(self._enter)
        module.register_forward_hook(self._leave)

    def _enter(self, module, args):
        if not module.training:
            self._saved.append(None)
            return
        seed = int(torch.randint(0, 2**62, (1,)))
        cuda = torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None
        self._saved.append((torch.get_rng_state(), cuda))
        torch.manual_seed((seed ^ (self._MIX * (self.tp_rank + 1))) % 2**63)

    def _leave(self, module, args, output):
        saved = self._saved.pop()
        if saved is not None:
            cpu, cuda = saved
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda)
        return output

    def shared(self, fn):
        """`fn` drawing from the stream shared by the TP group even when called inside a module
        that draws per rank (Reformer's hash rotations inside a kernel with attention dropout):
        the shared stream is swapped in for the call and advanced as if drawn outside, then the
        rank's own stream continues. Outside such a module `fn` runs as it is."""

        def call(*args, **kwargs):
            if not self._saved or self._saved[-1] is None:
                return fn(*args, **kwargs)
            own_cpu = torch.get_rng_state()
            own_cuda = torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None
            cpu, cuda = self._saved[-1]
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda)
            try:
                return fn(*args, **kwargs)
            finally:
                self._saved[-1] = (torch.get_rng_state(),
                                   torch.cuda.get_rng_state() if cuda is not None else None)
                torch.set_rng_state(own_cpu)
                if own_cuda is not None:
                    torch.cuda.set_rng_state(own_cuda)

        return call


def all_reduce_grad_over_tp(param: nn.Parameter, group) -> None:
    """Sum `param`'s gradient over the TP group before it is accumulated (for parameters used
    on sequence shards: each rank's gradient covers only its positions)."""

    def hook(grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=group)
        return grad

    param.register_hook(hook)

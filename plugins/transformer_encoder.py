"""Encoder ``"transformer"``: the DAPS paper's q(z|x), shared by DAPS and the baselines.

Patches (one per token, row-major over the latent grid; a patch may be non-square, e.g. 7 x 14
for 8 tokens of a 28 x 28 digit) -> linear projection + learned positions -> pre-LN
self-attention transformer (the *features*) -> a latent head:

* autoregressive (default): a causal transformer decoder fed its previous tokens (a dedicated
  START embedding, index V, begins every sequence), cross-attending to the patch features;
  token l sits on patch l.
* factorised (``factorised = true``, DAPS-NA): ``latent_depth`` more self-attention blocks over
  the patch features and a linear head; all tokens independent given x.

Sampling runs the patch transformer once per image and decodes L steps batched over K*B
sequences with a key/value cache; the K samples of an image share its cross-attention keys
(queries of all K samples are laid side by side against one copy of the image's keys).

Every parameter is used inside the ``forward`` of the module that owns it, so DeepSpeed ZeRO-3
gathers it even when the core calls ``sample`` or ``log_prob`` rather than ``forward``.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ngkit import hookimpl
from ngkit.components import Encoder, ImageSpec, LatentSpec, Register, TokenLogProb, pixel_stats
from ngkit.nn import attention, attention_backend

NGKIT_PLUGIN_API = 3  # written for this plugin API (docs/writing-a-plugin.md "Plugin API versions")

EMBED_INIT_STD = 0.02  # token/position embeddings, as in GPT-2 and ViT


class TransformerEncoder(Encoder):
    """ViT patch encoder with an autoregressive (or factorised) categorical head over codes."""

    def __init__(
        self,
        *,
        image: ImageSpec,
        latent: LatentSpec,
        width: int = 128,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 4.0,
        latent_depth: int = 2,
        factorised: bool = False,
        dropout: float = 0.0,
        head_init_scale: float = 1.0,
    ) -> None:
        super().__init__()
        patch = _patch_size(image, latent)
        _check_options(width, depth, heads, mlp_ratio, latent_depth, factorised, dropout, head_init_scale)
        self.latent = latent
        self.autoregressive = not factorised
        self.feature_dim = width
        hidden = int(width * mlp_ratio)

        self.patches = _PatchEmbed(image, patch, latent.tokens, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(_EncoderBlock(width, heads, hidden, dropout) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        if factorised:
            self.latent_blocks = nn.ModuleList(
                _EncoderBlock(width, heads, hidden, dropout) for _ in range(latent_depth)
            )
        else:
            self.tokens_in = _TokenInput(latent.codes, latent.tokens, width)
            self.latent_blocks = nn.ModuleList(
                _DecoderBlock(width, heads, hidden, dropout) for _ in range(latent_depth)
            )
        self.latent_norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, latent.codes)
        # > 1 starts q(z|x) sharper: codes then depend on x from the first step, so the decoder
        # has something to learn from before the policy has improved (docs/experiments.md, exp. 3).
        with torch.no_grad():
            self.head.weight.mul_(head_init_scale)

    @torch.no_grad()
    def split_codes(self, dst: Tensor, src: Tensor) -> None:
        """Code d copies code s in the head (and, autoregressive, as the next token's input).
        A code split into n copies shares its logit among n + 1 codes (each b_s - log(n + 1)),
        so q(z|x) is unchanged on relabelled sequences up to the mass the copies had before."""
        dst, src = dst.to(self.head.weight.device), src.to(self.head.weight.device)
        copies = torch.bincount(src, minlength=self.latent.codes).to(self.head.bias)
        self.head.bias -= torch.log1p(copies)
        self.head.weight[dst] = self.head.weight[src]
        self.head.bias[dst] = self.head.bias[src]
        if self.autoregressive:
            self.tokens_in.weight[dst] = self.tokens_in.weight[src]

    def describe(self) -> dict[str, str]:
        """For the run log: the attention kernel this encoder's tensors go through."""
        return {"attention": attention_backend() if self.head.weight.is_cuda else "sdpa"}

    def features(self, x: Tensor) -> Tensor:
        """Patch-transformer output ``[B, L, width]`` (the VQ-VAE/FSQ methods' encoder)."""
        h = self.drop(self.patches(x))
        for block in self.blocks:
            h = block(h)
        return self.norm(h)

    def log_prob(self, x: Tensor, z: Tensor) -> TokenLogProb:
        """Teacher-forced log q(z|x) for ``z [B, L]`` or ``[K, B, L]`` (K samples per image,
        x encoded once); logits ``[..., L, V]`` are log-softmaxed."""
        feats = self.features(x)
        if not self.autoregressive:
            return _factorised_score(self._factorised_logp(feats), z)
        squeeze = z.dim() == 2
        zk = z.unsqueeze(0) if squeeze else z
        start = zk.new_full((zk.shape[1], zk.shape[0], 1), self.latent.codes)
        prev = torch.cat([start, zk.transpose(0, 1)[..., :-1]], dim=-1)  # [B, K, L]
        logp = self._teacher_forced(feats, prev).transpose(0, 1)
        entropy = _entropy(logp)
        if squeeze:
            logp, entropy = logp[0], entropy[0]
        token_logq = logp.gather(-1, z.unsqueeze(-1)).squeeze(-1)
        return TokenLogProb(logq=token_logq.sum(-1), logits=logp, entropy=entropy)

    def sample_log_prob(self, x: Tensor, num_samples: int) -> tuple[Tensor, TokenLogProb]:
        """Factorised: ``z`` drawn from the logits of the one pass that scores it (the same
        numbers as ``sample`` then ``log_prob``, at the cost of one pass instead of two; with
        dropout the draw sees the pass's dropout mask)."""
        if self.autoregressive:
            return super().sample_log_prob(x, num_samples)
        base = self._factorised_logp(self.features(x))  # [B, L, V], with gradient
        with torch.no_grad():
            z = _draw_factorised(base.detach(), num_samples, 1.0)
        return z, _factorised_score(base, z)

    @torch.no_grad()
    def sample(self, x: Tensor, num_samples: int, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        """``z [K, B, L]`` drawn from q(z|x)^(1/temperature) token by token, and ``logq [K, B]``
        of those codes under the model itself (temperature 1), i.e. what ``log_prob`` returns."""
        if temperature <= 0:
            raise ValueError(
                f"sampling temperature must be positive, got {temperature}; use mode() for argmax"
            )
        feats = self.features(x)
        if not self.autoregressive:
            base = self._factorised_logp(feats)  # [B, L, V]
            z = _draw_factorised(base, num_samples, temperature)
            logq = base.expand(num_samples, *base.shape).gather(-1, z.unsqueeze(-1)).squeeze(-1)
            return z, logq.sum(-1)

        z, logq = self._autoregress(feats, num_samples, InverseCdfDraw(self.latent.tokens, temperature))
        return z.transpose(0, 1).contiguous(), logq.transpose(0, 1).contiguous()

    @torch.no_grad()
    def mode(self, x: Tensor) -> Tensor:
        """Greedy codes ``[B, L]``: argmax of each token given the greedy prefix."""
        feats = self.features(x)
        if not self.autoregressive:
            return self._factorised_logp(feats).argmax(-1)
        return self._autoregress(feats, 1, lambda logp: logp.argmax(-1))[0][:, 0]

    def relaxed_sample(self, x: Tensor, temperature: float, hard: bool) -> tuple[Tensor, Tensor]:
        """Gumbel-Softmax ``y [B, L, V]`` with gradients and the log-softmaxed logits it came from;
        the autoregressive head is fed its own relaxed tokens (y @ token embeddings)."""
        feats = self.features(x)
        if not self.autoregressive:
            logp = self._factorised_logp(feats)
            return _gumbel_softmax(logp, temperature, hard), logp
        memory = [block.cross.memory(feats) for block in self.latent_blocks]
        caches = [_KVCache(self.latent.tokens) for _ in self.latent_blocks]
        prev: Tensor = feats.new_full((feats.shape[0], 1, 1), self.latent.codes, dtype=torch.long)
        ys, logps = [], []
        for t in range(self.latent.tokens):
            logp = self._step(prev, t, memory, caches)[:, 0]  # [B, V]
            y = _gumbel_softmax(logp, temperature, hard)
            ys.append(y)
            logps.append(logp)
            prev = y[:, None, None, :]
        return torch.stack(ys, 1), torch.stack(logps, 1)

    def _factorised_logp(self, feats: Tensor) -> Tensor:
        h = feats
        for block in self.latent_blocks:
            h = block(h)
        return F.log_softmax(self.head(self.latent_norm(h)), dim=-1)

    def _teacher_forced(self, feats: Tensor, prev: Tensor) -> Tensor:
        """Log-probs ``[B, K, L, V]`` for previous tokens ``prev [B, K, L]`` in one causal pass."""
        h = self.drop(self.tokens_in(prev))
        for block in self.latent_blocks:
            h = block(h, block.cross.memory(feats))
        return F.log_softmax(self.head(self.latent_norm(h)), dim=-1)

    def _step(
        self, prev: Tensor, t: int, memory: list[tuple[Tensor, Tensor]], caches: list[_KVCache]
    ) -> Tensor:
        """Log-probs ``[B, K, V]`` of token t given token t-1 (``prev [B, K, 1]`` codes or
        ``[B, K, 1, V]`` relaxed); earlier tokens come from the caches."""
        h = self.drop(self.tokens_in(prev, start=t))
        for block, mem, cache in zip(self.latent_blocks, memory, caches):
            h = block(h, mem, cache)
        return F.log_softmax(self.head(self.latent_norm(h[:, :, 0])), dim=-1)

    def _autoregress(
        self, feats: Tensor, num_samples: int, pick: Callable[[Tensor], Tensor]
    ) -> tuple[Tensor, Tensor]:
        """Decode ``[B, K, L]`` codes (``pick`` maps log-probs ``[B, K, V]`` to codes ``[B, K]``)
        and their summed model log-probs ``[B, K]``, without autograd.

        The same function as :meth:`_step` token by token, with less around it per token: each
        block's step is one function with its cache allocated once (:class:`_DecodeStep`) instead
        of a dozen module calls and a cache that grows; on CPU its attention for the one new
        query is plain matmul-softmax-matmul over head-major caches (the flash kernel costs 2-3x
        more for a single query), with 1/sqrt(head_dim) folded into the query weights, so the
        low bits differ from :meth:`_step`'s (log q agrees with the teacher-forced pass to float
        rounding, tested)."""
        b, length = feats.shape[0], self.latent.tokens
        n = b * num_samples
        kernel = "matmul" if not feats.is_cuda else "xformers" if attention_backend() == "xformers" else "sdpa"
        drop = _dropout(self.drop)
        if kernel == "matmul":
            with torch.inference_mode():  # ~10 % less per token than no_grad; outputs copied out
                z, logq = self._autoregress_rows(feats, num_samples, pick, drop)
            return z.clone(), logq.clone()
        steps = [_DecodeStep(block, feats, n, length, kernel) for block in self.latent_blocks]
        prev = feats.new_full((b, num_samples, 1), self.latent.codes, dtype=torch.long)
        z = feats.new_empty((b, num_samples, length), dtype=torch.long)
        logq = feats.new_zeros((b, num_samples))
        norm, head = self.latent_norm, self.head
        for t in range(length):
            h = drop(self.tokens_in(prev, start=t))
            for step in steps:
                h = step(h, t)
            h = torch.layer_norm(h[:, :, 0], norm.normalized_shape, norm.weight, norm.bias, norm.eps)
            logp = F.log_softmax(F.linear(h, head.weight, head.bias), dim=-1)
            token = pick(logp)
            z[:, :, t] = token
            logq += logp.gather(-1, token.unsqueeze(-1)).squeeze(-1)
            prev = token.unsqueeze(-1)
        return z, logq

    def _autoregress_rows(
        self, feats: Tensor, num_samples: int, pick: Callable[[Tensor], Tensor], drop: Callable[[Tensor], Tensor]
    ) -> tuple[Tensor, Tensor]:
        """:meth:`_autoregress` on CPU: the N = B*K sequences' new tokens as ``[N, width]`` rows,
        weights pre-transposed, attention by matmul (:meth:`_DecodeStep.rows`). Every tensor
        of a fixed shape is allocated once and written in place (``out=``); the residual stream
        is one ``[N, width]`` row buffer the blocks add into."""
        b, length = feats.shape[0], self.latent.tokens
        n = b * num_samples
        table, pos = self.tokens_in.weight, self.tokens_in.pos
        dt = _matmul_dtype(table)
        cast = _cast(table.dtype, dt)
        steps = [_DecodeStep(block, feats, n, length, "matmul", dt) for block in self.latent_blocks]
        norm = self.latent_norm
        norm_shape, norm_w, norm_b, eps = norm.normalized_shape, norm.weight, norm.bias, norm.eps
        head_w, head_b = self.head.weight.t().to(dt).contiguous(), self.head.bias.to(dt)
        token = feats.new_full((n,), self.latent.codes, dtype=torch.long)  # START
        z = feats.new_empty((length, b, num_samples), dtype=torch.long)
        emb = table.new_empty((n, table.shape[1]))
        logits = head_w.new_empty((n, head_w.shape[1]))
        logp = torch.empty_like(logits)
        logp3 = logp.view(b, num_samples, -1)
        lq = logp.new_empty((length, b, num_samples, 1))  # each token's log q, summed at the end
        for t in range(length):
            h = drop(torch.index_select(table, 0, token, out=emb).add_(pos[t]))
            for step in steps:
                h = step.rows(h, t)
            h = cast(torch.layer_norm(h, norm_shape, norm_w, norm_b, eps))
            torch.log_softmax(torch.addmm(head_b, h, head_w, out=logits), -1, out=logp)
            picked = pick(logp3)  # [B, K]
            z[t] = picked
            torch.gather(logp3, -1, picked.unsqueeze(-1), out=lq[t])
            token = picked.view(n)
        return z.permute(1, 2, 0), lq.sum(0).squeeze(-1)


def _cast(src: torch.dtype, dst: torch.dtype) -> Callable[[Tensor], Tensor]:
    """``tensor.to(dst)`` for tensors of dtype ``src``; the identity (no call) when they agree."""
    return (lambda x: x) if src == dst else (lambda x: x.to(dst))


def _matmul_dtype(weight: Tensor) -> torch.dtype:
    """The dtype matmuls produce on CPU: autocast's (it casts their inputs, weights included,
    which the sampler's ``out=`` matmuls, bypassing autocast, do explicitly) or the weights'."""
    return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else weight.dtype


def _dropout(module: nn.Dropout) -> Callable[[Tensor], Tensor]:
    """``module`` as a function; the identity when it drops nothing (p = 0 or eval mode), which
    is what dropout returns then, without the calls."""
    if module.p == 0 or not module.training:
        return lambda x: x
    return lambda x: F.dropout(x, module.p, True)


class InverseCdfDraw:
    """Codes ``[B, K]`` from log-probs ``[B, K, V]`` raised to 1/temperature, one uniform per
    token and sequence: the first code whose cumulative probability exceeds u times the total,
    an exact draw from the categorical (up to float32 rounding of the cumulative sum). The
    uniforms for all ``length`` tokens are drawn at the first call (one generator call instead of
    one ``multinomial`` per token, which also draws V exponentials per row). A row with a
    non-finite entry (a diverged step) still yields a valid code, so sampling goes on and the
    step's non-finite log q makes the trainer skip it; nothing is checked per token (on a GPU
    a check would wait for the device)."""

    def __init__(self, length: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> None:
        self.length, self.temperature, self.generator = length, temperature, generator
        self.uniforms: Tensor | None = None
        self.t = 0

    def __call__(self, logp: Tensor) -> Tensor:
        if self.uniforms is None:
            self.uniforms = torch.rand((self.length, *logp.shape[:-1], 1), generator=self.generator,
                                       device=logp.device, dtype=torch.float32)
        u = self.uniforms[self.t]
        self.t += 1
        # at temperature 1 the log-probs are normalised: exp is the softmax, one kernel cheaper
        probs = logp.float().exp() if self.temperature == 1 else (logp.float() / self.temperature).softmax(-1)
        codes = probs.shape[-1]
        cdf = probs.cumsum_(-1)  # in place: the same sequential sums
        # a non-finite row (NaN or inf in the cumulative sum) gives some index in [0, V]: clamped,
        # it is a valid code, and the row's non-finite log q makes the trainer skip the step
        token = torch.searchsorted(cdf, u * cdf.narrow(-1, codes - 1, 1), right=True)
        return token.clamp_max_(codes - 1).squeeze(-1)


class _DecodeStep:
    """One :class:`_DecoderBlock` for one new token at a time, without autograd: the same
    operations on the same shapes as its ``forward`` with a cache (so the same numbers), with
    its weights bound once, a static ``[N, H, L, head_dim]`` cache, and the patch keys/values
    laid out ``[B, H, P, head_dim]`` once, as the SDPA kernel reads them (``sdpa``; xformers on a
    GPU takes the token-major views through :func:`ngkit.nn.attention`). ``kernel = "matmul"``:
    the CPU layout of :meth:`rows`, its matmuls producing ``dtype``."""

    def __init__(
        self, block: _DecoderBlock, feats: Tensor, n: int, length: int, kernel: str, dtype: torch.dtype | None = None
    ) -> None:
        self.block, self.sdpa, self.drop = block, kernel != "xformers", _dropout(block.drop)
        self.heads = heads = block.attn.heads
        width = feats.shape[-1]
        k, v = block.cross.memory(feats)  # [B, P, H, D]
        if kernel == "matmul":
            self._bind_rows(block, k, v, n, length, width, dtype or k.dtype)
            return
        self.memory = (k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous())  # [B, H, P, D]
        self.cache_k = feats.new_empty(n, heads, length, width // heads)
        self.cache_v = torch.empty_like(self.cache_k)

    def _bind_rows(
        self, block: _DecoderBlock, k: Tensor, v: Tensor, n: int, length: int, width: int, dt: torch.dtype
    ) -> None:
        """The matmul path's layout: every tensor bound once as a plain attribute (a module's
        attribute lookup costs more than some of these kernels), weights transposed for
        ``rows @ w`` and cast to ``dt`` once (what autocast would cast them to at every call),
        the softmax scale in the query weights, keys head-major and transposed ``[., head_dim,
        S]`` (q @ k without a copy), values ``[., S, head_dim]``; and the token's fixed-shape
        intermediates, which :meth:`rows` writes in place, with their views made once."""
        heads, hd = self.heads, width // self.heads
        scale = hd**-0.5
        qkv = block.attn.qkv.weight.detach().clone()
        qkv[:width] *= scale
        # output rows reordered from (q/k/v, head, dim) to (head, q/k/v, dim): each head's q, k
        # and v of all N rows are then [N*H, dim] views for bmm
        w_qkv = qkv.view(3, heads, hd, width).transpose(0, 1).reshape(3 * width, width).t()
        up, _, down = block.mlp
        ln1, ln2, ln3 = block.ln1, block.ln2, block.ln3
        self.eps = (ln1.eps, ln2.eps, ln3.eps)
        lns = (ln1.weight, ln1.bias, ln2.weight, ln2.bias, ln3.weight, ln3.bias)
        mats = (
            w_qkv, block.attn.out.weight.t(), block.attn.out.bias, (block.cross.q.weight.detach() * scale).t(),
            block.cross.out.weight.t(), block.cross.out.bias, up.weight.t(), up.bias, down.weight.t(), down.bias,
        )
        self.lns, self.mats = lns, tuple(w.to(dt).contiguous() for w in mats)
        b, p = k.shape[0], k.shape[1]
        self.mem_kt = k.permute(0, 2, 3, 1).reshape(b * heads, hd, p)  # [B*H, D, P]
        self.mem_v = v.transpose(1, 2).reshape(b * heads, p, hd)  # [B*H, P, D]
        self.cache_kt = k.new_empty(n * heads, hd, length)
        self.cache_v = k.new_empty(n * heads, length, hd)
        kq = n // b  # queries per image
        new = k.new_empty
        self.cast = _cast(ln1.weight.dtype, dt)  # layer-norm outputs to the matmuls' dtype
        self.qkv, self.proj = new(n, 3 * width, dtype=dt), new(n, width, dtype=dt)
        q, self.key, self.value = self.qkv.view(n * heads, 3, hd).unbind(1)  # [N*H, D] each
        self.q = q.unsqueeze(1)
        self.att_out = new(n * heads, 1, hd, dtype=dt)
        self.att_rows = self.att_out.view(n, width)
        self.cq = new(n, width, dtype=dt)
        self.cq_by_head = self.cq.view(b, kq, heads, hd).transpose(1, 2)  # [B, H, K, D] view
        self.cq_heads = new(b * heads, kq, hd, dtype=dt)
        self.cq_heads_split = self.cq_heads.view(b, heads, kq, hd)
        self.c_scores, self.c_att = new(b * heads, kq, p, dtype=dt), new(b * heads, kq, p, dtype=dt)
        self.c_out = new(b * heads, kq, hd, dtype=dt)
        self.c_out_by_row = self.c_out.view(b, heads, kq, hd).transpose(1, 2)  # [B, K, H, D] view
        self.c_rows = new(n, width, dtype=dt)
        self.c_rows_split = self.c_rows.view(b, kq, heads, hd)
        self.up = new(n, up.out_features, dtype=dt)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Head-major ``q [N, H, M, D]``, ``k, v [N, H, S, D]`` -> token-major ``[N, M, H, D]``."""
        if self.sdpa:  # what ngkit.nn's SDPA path computes, without its transposes
            return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)
        return attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))

    def __call__(self, x: Tensor, t: int) -> Tensor:
        blk, heads, drop = self.block, self.heads, self.drop
        b, k, m, d = x.shape
        ln1, ln2, ln3, attn, cross = blk.ln1, blk.ln2, blk.ln3, blk.attn, blk.cross
        up, _, down = blk.mlp
        flat = x.reshape(b * k, m, d)
        h = torch.layer_norm(flat, ln1.normalized_shape, ln1.weight, ln1.bias, ln1.eps)
        q, key, value = F.linear(h, attn.qkv.weight).view(b * k, m, 3, heads, d // heads).unbind(2)
        self.cache_k[:, :, t] = key[:, 0]
        self.cache_v[:, :, t] = value[:, 0]
        out = self._attend(q.transpose(1, 2), self.cache_k[:, :, : t + 1], self.cache_v[:, :, : t + 1])
        flat = flat + drop(F.linear(out.reshape(b * k, m, d), attn.out.weight, attn.out.bias))
        seq = flat.view(b, k * m, d)
        h = torch.layer_norm(seq, ln2.normalized_shape, ln2.weight, ln2.bias, ln2.eps)
        q = F.linear(h, cross.q.weight).view(b, k * m, heads, d // heads)
        out = self._attend(q.transpose(1, 2), *self.memory)
        seq = seq + drop(F.linear(out.reshape(b, k * m, d), cross.out.weight, cross.out.bias))
        h = torch.layer_norm(seq, ln3.normalized_shape, ln3.weight, ln3.bias, ln3.eps)
        seq = seq + drop(F.linear(F.gelu(F.linear(h, up.weight, up.bias)), down.weight, down.bias))
        return seq.view(b, k, m, d)

    def rows(self, x: Tensor, t: int) -> Tensor:
        """The block on the new token of each of the N = B*K sequences, ``x [N, width]``, added
        into ``x`` in place (the same sums as ``x = x + ...``) and returned."""
        ln1w, ln1b, ln2w, ln2b, ln3w, ln3b = self.lns
        w_qkv, w_out, b_out, w_cq, w_cout, b_cout, w_up, b_up, w_down, b_down = self.mats
        eps1, eps2, eps3 = self.eps
        drop, cast, d, proj = self.drop, self.cast, x.shape[1], self.proj
        torch.mm(cast(torch.layer_norm(x, (d,), ln1w, ln1b, eps1)), w_qkv, out=self.qkv)
        self.cache_kt.select(2, t).copy_(self.key)
        self.cache_v.select(1, t).copy_(self.value)
        att = torch.bmm(self.q, self.cache_kt.narrow(2, 0, t + 1)).softmax(-1)  # [N*H, 1, t+1]
        torch.bmm(att, self.cache_v.narrow(1, 0, t + 1), out=self.att_out)
        x.add_(drop(torch.addmm(b_out, self.att_rows, w_out, out=proj)))
        # the K queries of an image side by side against its keys: [B*H, K, D]
        torch.mm(cast(torch.layer_norm(x, (d,), ln2w, ln2b, eps2)), w_cq, out=self.cq)
        self.cq_heads_split.copy_(self.cq_by_head)
        torch.softmax(torch.bmm(self.cq_heads, self.mem_kt, out=self.c_scores), -1, out=self.c_att)
        torch.bmm(self.c_att, self.mem_v, out=self.c_out)
        self.c_rows_split.copy_(self.c_out_by_row)
        x.add_(drop(torch.addmm(b_cout, self.c_rows, w_cout, out=proj)))
        h = cast(torch.layer_norm(x, (d,), ln3w, ln3b, eps3))
        torch._addmm_activation(b_up, h, w_up, use_gelu=True, out=self.up)  # addmm, then gelu in place
        return x.add_(drop(torch.addmm(b_down, self.up, w_down, out=proj)))


class _PatchEmbed(nn.Module):
    """Standardised image -> row-major patches (each flattened channel, row, column) -> linear
    projection + learned positions."""

    def __init__(self, image: ImageSpec, patch: tuple[int, int], tokens: int, width: int) -> None:
        super().__init__()
        self.patch = patch
        mean, std = pixel_stats(image)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)
        self.proj = nn.Linear(image.channels * patch[0] * patch[1], width)
        self.pos = nn.Parameter(torch.randn(tokens, width) * EMBED_INIT_STD)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        ph, pw = self.patch
        x = ((x - self.mean) / self.std).to(self.proj.weight.dtype)  # stats stay fp32 under bf16
        x = x.view(b, c, h // ph, ph, w // pw, pw).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * ph * pw)
        return self.proj(x) + self.pos


class _TokenInput(nn.Module):
    """Embedding of the previous token plus the position of the token being predicted.

    Row V of the table is START, so no real code doubles as a begin/padding symbol.
    """

    def __init__(self, codes: int, tokens: int, width: int) -> None:
        super().__init__()
        self.codes = codes
        self.weight = nn.Parameter(torch.randn(codes + 1, width) * EMBED_INIT_STD)
        self.pos = nn.Parameter(torch.randn(tokens, width) * EMBED_INIT_STD)

    def forward(self, prev: Tensor, start: int = 0) -> Tensor:
        """``prev``: codes ``[..., M]`` (V = START) or relaxed one-hots ``[..., M, V]``;
        positions ``start .. start+M-1``."""
        e = prev @ self.weight[: self.codes] if prev.is_floating_point() else F.embedding(prev, self.weight)
        return e + self.pos[start : start + e.shape[-2]]


class _SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.out = nn.Linear(width, width)

    def forward(self, x: Tensor, causal: bool, cache: _KVCache | None = None) -> Tensor:
        n, m, d = x.shape
        q, k, v = self.qkv(x).view(n, m, 3, self.heads, d // self.heads).unbind(2)
        if cache is not None:
            k, v = cache.append(k, v)
        return self.out(attention(q, k, v, causal=causal).reshape(n, m, d))


class _CrossAttention(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width, bias=False)
        self.kv = nn.Linear(width, 2 * width, bias=False)
        self.out = nn.Linear(width, width)

    def memory(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values ``[B, P, H, head_dim]`` of the patch features, computed once per image."""
        b, p, d = feats.shape
        k, v = self.kv(feats).view(b, p, 2, self.heads, d // self.heads).unbind(2)
        return k, v

    def forward(self, x: Tensor, memory: tuple[Tensor, Tensor]) -> Tensor:
        b, s, d = x.shape
        q = self.q(x).view(b, s, self.heads, d // self.heads)
        return self.out(attention(q, *memory).reshape(b, s, d))


def _mlp(width: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))


class _EncoderBlock(nn.Module):
    """Pre-LN block: self-attention over all positions, then an MLP."""

    def __init__(self, width: int, heads: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = _SelfAttention(width, heads)
        self.mlp = _mlp(width, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.drop(self.attn(self.ln1(x), causal=False))
        return x + self.drop(self.mlp(self.ln2(x)))


class _DecoderBlock(nn.Module):
    """Pre-LN block over ``[B, K, M, width]``: causal self-attention within each of the K
    sequences, cross-attention of all K*M queries of an image to its patch keys, MLP."""

    def __init__(self, width: int, heads: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = _SelfAttention(width, heads)
        self.cross = _CrossAttention(width, heads)
        self.mlp = _mlp(width, hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, memory: tuple[Tensor, Tensor], cache: _KVCache | None = None) -> Tensor:
        """Without a cache: all M positions, causally masked. With one: M = 1 new token that
        attends to the cached past and itself."""
        b, k, m, d = x.shape
        flat = x.reshape(b * k, m, d)
        flat = flat + self.drop(self.attn(self.ln1(flat), causal=cache is None, cache=cache))
        seq = flat.view(b, k * m, d)
        seq = seq + self.drop(self.cross(self.ln2(seq), memory))
        seq = seq + self.drop(self.mlp(self.ln3(seq)))
        return seq.view(b, k, m, d)


class _KVCache:
    """Self-attention keys/values of the tokens decoded so far, for one layer.

    Without autograd (sampling) they go into a preallocated ``[N, L, H, head_dim]`` buffer. With
    autograd (``relaxed_sample``) the buffer grows by concatenation instead, because in-place
    writes would invalidate the views saved for backward; that costs memory quadratic in L.
    """

    def __init__(self, length: int) -> None:
        self.length = length
        self.size = 0
        self.k: Tensor | None = None
        self.v: Tensor | None = None

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if torch.is_grad_enabled():
            self.k = k if self.k is None else torch.cat([self.k, k], dim=1)
            self.v = v if self.v is None else torch.cat([self.v, v], dim=1)
            return self.k, self.v
        if self.k is None or self.v is None:
            self.k = k.new_empty(k.shape[0], self.length, *k.shape[2:])
            self.v = v.new_empty(v.shape[0], self.length, *v.shape[2:])
        self.k[:, self.size] = k[:, 0]
        self.v[:, self.size] = v[:, 0]
        self.size += 1
        return self.k[:, : self.size], self.v[:, : self.size]


def _samplable(probs: Tensor) -> Tensor:
    """Probabilities ``multinomial`` accepts: a row with a non-finite entry (a diverged step) is
    made uniform, so sampling goes on and the step's non-finite log q makes the trainer skip it.
    On CPU one min/max pass decides whether any row needs it (NaN reaches both ends; 10x cheaper
    than an isfinite mask per token); on a GPU the rows are replaced without asking, as asking
    would wait for the device at every token."""
    if not probs.is_cuda and all(math.isfinite(v) for v in torch.aminmax(probs)):
        return probs
    good = torch.isfinite(probs).all(-1, keepdim=True)
    return torch.where(good, probs, torch.full_like(probs, 1.0 / probs.shape[-1]))


def _draw_factorised(base: Tensor, num_samples: int, temperature: float) -> Tensor:
    """``z [K, B, L]`` from factorised log-probs ``base [B, L, V]`` raised to 1/temperature."""
    probs = _samplable((base / temperature).softmax(-1).flatten(0, 1))
    z = torch.multinomial(probs, num_samples, replacement=True)  # [B*L, K]
    return z.view(*base.shape[:2], num_samples).permute(2, 0, 1).contiguous()


def _factorised_score(base: Tensor, z: Tensor) -> TokenLogProb:
    """Teacher-forced output for codes ``z [B, L]`` or ``[K, B, L]`` under ``base [B, L, V]``.
    K samples' logits are K expand views of ``base``, and their log q is read from ``base``
    itself (:func:`_gather_samples`): no ``[K, B, L, V]`` tensor, forward or backward."""
    if z.dim() == 2:
        token_logq = base.gather(-1, z.unsqueeze(-1)).squeeze(-1)
        return TokenLogProb(logq=token_logq.sum(-1), logits=base, entropy=_entropy(base))
    return TokenLogProb(logq=_gather_samples(base, z).sum(-1), logits=base.expand(z.shape[0], *base.shape),
                        entropy=_entropy(base).expand(z.shape))


def _gather_samples(base: Tensor, z: Tensor) -> Tensor:
    """``base[b, l, z[k, b, l]]`` as ``[K, B, L]``: the K samples' log-probs gathered from the one
    ``[B, L, V]`` copy they share. Its backward scatter-adds their gradients into one ``[B, L, V]``
    tensor in sample order, where gathering from ``base.expand(K, ...)`` made a ``[K, B, L, V]``
    gradient that the expand then summed over K. The two are the same additions; they are the
    same bits wherever torch sums those K terms in order too, which its outer-dimension sum does
    on one thread for K <= 16 when B*L*V is a multiple of 64 (tests/test_step_cost.py)."""
    return base.gather(-1, z.permute(1, 2, 0)).permute(2, 0, 1).contiguous()


def _entropy(logp: Tensor) -> Tensor:
    return -(logp.exp() * logp).sum(-1)


def _gumbel_softmax(logp: Tensor, temperature: float, hard: bool) -> Tensor:
    """softmax((logits + Gumbel noise) / temperature); if ``hard``, the argmax one-hot in the
    forward pass (exactly: soft - soft is 0) with the soft sample's gradient (straight-through)."""
    gumbel = -torch.empty_like(logp).exponential_().log()
    soft = ((logp + gumbel) / temperature).softmax(-1)
    if not hard:
        return soft
    one_hot = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)
    return one_hot + (soft - soft.detach())


def _check_options(
    width: int, depth: int, heads: int, mlp_ratio: float, latent_depth: int, factorised: bool,
    dropout: float, head_init_scale: float,
) -> None:
    """A ValueError naming the first option that cannot make a working encoder."""
    minimum = 0 if factorised else 1  # an autoregressive head sees the image only through these
    checks = [
        (width >= 1, f"width must be at least 1, got {width}"),
        (depth >= 1, f"depth must be at least 1, got {depth}"),
        (heads >= 1, f"heads must be at least 1, got {heads}"),
        (width % max(heads, 1) == 0, f"width {width} must be divisible by heads {heads}"),
        (mlp_ratio > 0 and math.isfinite(mlp_ratio), f"mlp_ratio must be a positive number, got {mlp_ratio}"),
        (latent_depth >= minimum,
         f"latent_depth must be at least {minimum} {'(factorised)' if factorised else '(autoregressive)'}, got {latent_depth}"),
        (0 <= dropout < 1, f"dropout must be in [0, 1), got {dropout}"),
        (head_init_scale > 0 and math.isfinite(head_init_scale),
         f"head_init_scale must be a positive finite number, got {head_init_scale}"),
    ]
    for ok, problem in checks:
        if not ok:
            raise ValueError(f"transformer encoder: {problem}")


def _patch_size(image: ImageSpec, latent: LatentSpec) -> tuple[int, int]:
    """(height, width) of the patch that puts one token on each cell of the latent grid."""
    rows, cols = latent.grid
    if image.height % rows or image.width % cols:
        raise ValueError(
            f"transformer encoder: a {image.height}x{image.width} image does not split into a "
            f"{rows}x{cols} grid of equal patches; pick a [model] patch_size (p, or [height, width]) "
            "whose height divides the image height and whose width divides its width"
        )
    return image.height // rows, image.width // cols


@hookimpl
def register_encoders(register: Register) -> None:
    register("transformer", TransformerEncoder)

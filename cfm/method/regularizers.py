"""Training regularizers for flow matching: the locality loss and the anchor (centroid) loss.

Both plug into the one training loop (the `Regularizer` protocol of cfm/training/trainer.py):
`extra_inputs` says where the network must also be evaluated; the loop appends those rows to the
main batch, makes one forward call, splits the output and hands the extra rows back to `loss`.

Both are computed as the published scripts compute them: on the batch **as drawn** -- the
single-cluster images ``x1`` and the noise ``x0`` before any OT re-pairing (otcfm re-pairs, and
with ``--ot_pairing=replacement`` its batch repeats about a third of its images) -- and on the
straight line ``z_t = t z + (1 - t) x0 + sigma eps`` between ``x0`` and an image ``z``, for every
``--model``. For a field that is exactly the conditional target of that line, ``v(z_t, t) = z - x0``,
the difference of two predictions sharing ``t``, ``x0`` and ``eps`` is the difference of the two
images; the losses penalise deviation from that:

=========  ==============================================  ======================================
name       loss (mean over batch, channels and pixels)      points
=========  ==============================================  ======================================
local      mean (v(u_t, t) - v(s_t, t) + s - u)^2           u = x1 (one cluster), s = u permuted,
                                                            fresh t ~ U(0, 1), fresh eps
anchor     full:   mean (v(x_t, t) - v(e_t, t) + e - x1)^2  e = centroid of x1's cluster; the main
           simple: mean (v(x_t, t) - v(e_t, t))^2           term's t, a fresh eps
=========  ==============================================  ======================================

"mean" is ``torch.mean`` of the squared difference, the same reduction as ``loss_fm``, so a weight
lambda means what it meant in the published runs.

Usage (what `training.Trainer.step` does)::

    reg.before_step(step)
    x1, cluster = batches.next_batch(); x0 = torch.randn_like(x1)
    sample = matcher.sample(x0, x1)                               # may re-pair (otcfm)
    t_extra, x_extra, ctx, rows = reg.extra_inputs(x1, x0, cluster, sample)   # the batch as drawn
    v = net(torch.cat([sample.t, t_extra]), torch.cat([sample.xt, x_extra]))
    vt, v_extra = v[:B], v[B:]
    loss = mse(vt, sample.ut) + reg.weight * reg.loss(vt, v_extra, ctx)

``rows`` ``[E]`` names the image of the batch as drawn that each extra row evaluates (``x1[rows]``;
for a centroid row, the image whose centroid it is), so a conditional run gives every extra row
its image's label (training/conditioning.py). Extra rows come in ``E / B`` chunks of ``B``, and
row ``r`` is compared with row ``r % B`` of the other chunk (or of the main rows).
"""

from __future__ import annotations

import torch
from torch import Tensor

# ANCHOR_PAIRINGS: published, the anchor term's own x_t from the batch as drawn (two extra rows per
# sample); main, the main term's re-paired x_t and prediction (one extra row; STRAIGHT_LINE_MODELS only).
from cfm.config.choices import ANCHOR_LOSS_TYPES, ANCHOR_PAIRINGS
from cfm.method.flow_matching import FlowSample, pad_t_like_x


def straight_line(t: Tensor, z: Tensor, x0: Tensor, eps: Tensor, sigma: float) -> Tensor:
    """``t z + (1 - t) x0 + sigma eps`` for ``t`` ``[B]`` and ``z``, ``x0``, ``eps`` ``[B, ...]``."""
    t = pad_t_like_x(t, z)
    return t * z + (1 - t) * x0 + sigma * eps


class LocalRegularizer:
    """Locality loss: predictions at two images of one cluster differ by the images' difference.

    With ``u = x1`` (the batch as drawn, one cluster), ``s = u[perm]`` for a random permutation,
    the noise ``x0`` as drawn, a fresh ``t ~ U(0, 1)`` per sample and a fresh ``eps`` shared by
    both lines (the published ``compute_local_loss(net, x1, x0)``)::

        u_t = t u + (1 - t) x0 + sigma eps,   s_t = t s + (1 - t) x0 + sigma eps
        loss = mean (v(u_t, t) - v(s_t, t) + s - u)^2

    Two extra evaluations per sample (``E = 2B`` extra rows: ``u_t`` then ``s_t``). Neither the
    main sample nor the main prediction is used, so the loss can also be computed alone
    (``sample=None``, ``vt=None``), e.g. under ``torch.no_grad()`` to monitor it in a run that does
    not train on it.

    ``t``, the permutation and ``eps`` are drawn in that order from ``generator`` (the loop's
    step stream, seeded and checkpointed by the loop; torch's global RNG when ``None``), so this
    object has no state of its own.

    Args:
        weight: lambda, the loss's weight in the total loss.
        sigma: width of the Gaussian tube around the line (the run's ``--sigma``).
    """

    name = "local"

    def __init__(self, weight: float, sigma: float = 0.0):
        self.weight = float(weight)
        self.sigma = float(sigma)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weight={self.weight}, sigma={self.sigma})"

    def extra_inputs(self, x1: Tensor, x0: Tensor, cluster: Tensor | None, sample: FlowSample | None = None,
                     generator: torch.Generator | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Returns ``(t_extra [2B], x_extra [2B, ...], u - s [B, ...], rows [2B])`` from the batch
        ``x1`` and noise ``x0`` as drawn (rows: ``0..B-1`` then the permutation); ``cluster`` and
        ``sample`` are unused (the batch is a single cluster by construction of the batch source).
        ``generator`` must live on ``x1``'s device."""
        u = x1
        batch = u.shape[0]
        t = torch.rand(batch, dtype=u.dtype, device=u.device, generator=generator)
        perm = torch.randperm(batch, device=u.device, generator=generator)
        s = u[perm]
        eps = torch.randn(u.shape, dtype=u.dtype, device=u.device, generator=generator)
        u_t = straight_line(t, u, x0, eps, self.sigma)
        s_t = straight_line(t, s, x0, eps, self.sigma)
        return torch.cat([t, t]), torch.cat([u_t, s_t]), u - s, torch.cat([torch.arange(batch, device=u.device), perm])

    def loss(self, vt: Tensor | None, v_extra: Tensor, ctx: Tensor) -> Tensor:
        """Scalar ``mean (v(u_t) - v(s_t) - (u - s))^2`` from the ``2B`` extra outputs ``v_extra``."""
        v_u, v_s = v_extra.chunk(2)
        return (v_u - v_s - ctx).square().mean()

    def before_step(self, step: int) -> None:
        """Nothing to refresh."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Nothing to restore (the global RNG is checkpointed by the loop)."""


class AnchorRegularizer:
    """Anchor loss: predictions at an image and at its cluster's centroid differ as the two do.

    With ``e = e(x1)`` the centroid of x1's cluster, ``t`` the main term's times, and (pairing
    ``"published"``, the default) the batch ``x1`` and noise ``x0`` as drawn with a fresh ``eps``::

        x_t = t x1 + (1 - t) x0 + sigma eps
        e_t = t e  + (1 - t) x0 + sigma eps
        full   = mean (v(x_t, t) - v(e_t, t) + e - x1)^2
        simple = mean (v(x_t, t) - v(e_t, t))^2

    Two extra rows per sample (``x_t`` then ``e_t``). For otcfm this ``x_t`` is not the main
    term's ``xt``: the main term re-pairs ``(x0, x1)`` by OT first, the anchor term does not.

    Pairing ``"main"`` (a deviation from the published scripts, one extra row per sample instead
    of two) uses the main term's re-paired ``x1``, ``x0`` and ``eps``, so ``x_t`` is the main
    ``xt`` and ``v(x_t, t)`` is the main prediction ``vt``; only ``e_t`` is an extra row. Valid only
    where the main ``xt`` is that straight line: ``--model`` in :data:`cfm.config.choices.STRAIGHT_LINE_MODELS`
    (the training script refuses the others).

    Centroids are looked up per sample from ``cluster``. With ``"main"`` pairing otcfm re-orders
    ``x1`` inside the matcher; the ids stay aligned only because every batch comes from one
    cluster (as `ClassConditionedSampler` guarantees).

    Centroids (see :meth:`compute_centroids`) are recomputed in :meth:`before_step` when none exist
    yet or when ``step % update_freq == 0``.

    Args:
        weight: lambda, the loss's weight in the total loss.
        sigma: width of the Gaussian tube around the line (the run's ``--sigma``).
        loss_type: ``"full"`` or ``"simple"``.
        images: uint8 ``[N, 3, H, W]`` training images (un-flipped), on the data device.
        assignment: int64 ``[N]`` flattened cluster id of each image, in ``[0, num_clusters)``.
        num_clusters: K, the range of cluster ids (some clusters may be empty).
        update_freq: steps between centroid refreshes (``--centroid_update_freq``).
        centroid_samples: members averaged per cluster, drawn without replacement (all members
            when a cluster has fewer); 0 = all members.
        pairing: ``"published"`` or ``"main"`` (see above; ``--anchor_pairing``).
        seed: seed of the CPU generator that draws the centroid subsets.
        centroid_dtype: the centroids' dtype: float32 (training, as published) or float64 (to check
            the loss in float64, where float32 centroids would be its largest rounding error).
    """

    name = "anchor"

    def __init__(
        self,
        weight: float,
        sigma: float,
        loss_type: str,
        images: Tensor,
        assignment: Tensor,
        num_clusters: int,
        update_freq: int = 1000,
        centroid_samples: int = 500,
        pairing: str = "published",
        seed: int = 0,
        centroid_dtype: torch.dtype = torch.float32,
    ):
        if loss_type not in ANCHOR_LOSS_TYPES:
            raise ValueError(f"--anchor_loss_type must be full or simple, got {loss_type!r}.")
        if pairing not in ANCHOR_PAIRINGS:
            raise ValueError(f"--anchor_pairing must be published or main, got {pairing!r}.")
        if update_freq <= 0:
            raise ValueError(f"--centroid_update_freq must be positive, got {update_freq}.")
        if centroid_samples < 0:
            raise ValueError(f"centroid_samples must be >= 0 (0 = all members), got {centroid_samples}.")
        if centroid_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"centroid_dtype must be torch.float32 or torch.float64, got {centroid_dtype}.")
        if images.dtype != torch.uint8 or assignment.shape != images.shape[:1]:
            raise ValueError(
                f"images must be uint8 [N,C,H,W] with one cluster id each, got {images.dtype} "
                f"{tuple(images.shape)} and assignment {tuple(assignment.shape)}."
            )
        if assignment.numel() and not 0 <= int(assignment.min()) <= int(assignment.max()) < num_clusters:
            raise ValueError(f"cluster ids must lie in [0, {num_clusters}) (num_clusters={num_clusters}).")
        self.weight = float(weight)
        self.sigma = float(sigma)
        self.loss_type = loss_type
        self.images = images
        # The subset draw runs on the CPU generator, so the ids it sorts live there too.
        self.assignment = assignment.detach().to("cpu", torch.int64)
        self.num_clusters = int(num_clusters)
        self.update_freq = int(update_freq)
        self.centroid_samples = int(centroid_samples)
        self.pairing = pairing
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.centroid_dtype = centroid_dtype
        self.centroids: Tensor | None = None  # centroid_dtype [K, C, H, W] on images.device

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(weight={self.weight}, sigma={self.sigma}, loss_type={self.loss_type!r}, "
                f"num_clusters={self.num_clusters}, update_freq={self.update_freq}, "
                f"centroid_samples={self.centroid_samples}, pairing={self.pairing!r})")

    # ---------------------------------------------------------------------------------- centroids

    def compute_centroids(self) -> Tensor:
        """Per-cluster mean image in model range, from a fresh random subset of each cluster,
        averaged with its mirror image.

        Returns ``centroid_dtype`` ``[K, C, H, W]`` on the images' device: ``(m + flip(m)) / 2`` with
        ``m = mean_i (x_i / 127.5 - 1)`` over ``min(centroid_samples, |c|)`` members of cluster c
        drawn without replacement (all members when ``centroid_samples == 0``); a zero image for
        an empty cluster. Why the mirror: training batches flip each image left-right with
        probability 1/2, so the centroid is the mean of the members *as the net sees them*; it is
        flip-invariant, hence the right anchor for an x1 in either orientation.

        One ``randperm`` over all N images, stably sorted by cluster id, lists each cluster's
        members contiguously and in uniformly random order; the first ``m`` of each run are its
        subset. Each cluster is then one index gather and one sum on the images' device. The uint8
        values are summed in float32, which is exact (integers below 2^24) for clusters of up to
        65,793 images, so the result does not depend on the summation order; the map to model
        range is applied once, in float64, as ``sum / n / 127.5 - 1``, and rounded to
        ``centroid_dtype`` before the mirror average.
        """
        n = self.assignment.shape[0]
        # The all-members case draws nothing, so the generator only advances for real subsets.
        order = torch.randperm(n, generator=self.generator) if self.centroid_samples else torch.arange(n)
        order = order[torch.argsort(self.assignment[order], stable=True)]
        counts = torch.bincount(self.assignment, minlength=self.num_clusters)
        counts_used = counts.clamp(max=self.centroid_samples) if self.centroid_samples else counts

        flat = self.images.reshape(n, -1)
        sums = torch.zeros(self.num_clusters, flat.shape[1], dtype=torch.float32, device=flat.device)
        # One host-to-device copy of the order; the per-cluster runs are views of it.
        runs = order.to(flat.device).split(counts.tolist())
        for cluster, (run, used) in enumerate(zip(runs, counts_used.tolist())):
            if used:
                sums[cluster] = flat.index_select(0, run[:used]).sum(0, dtype=torch.float32)
        used = counts_used.to(flat.device, torch.float64)[:, None]
        means = torch.where(used > 0, sums.double() / used.clamp(min=1) / 127.5 - 1, 0.0)
        means = means.to(self.centroid_dtype).reshape(self.num_clusters, *self.images.shape[1:])
        return (means + means.flip(-1)) / 2

    def before_step(self, step: int) -> None:
        """Refresh the centroids when none exist yet or when ``step % update_freq == 0``."""
        if self.centroids is None or step % self.update_freq == 0:
            self.centroids = self.compute_centroids()

    # ------------------------------------------------------------------------------------- loss

    def extra_inputs(self, x1: Tensor, x0: Tensor, cluster: Tensor, sample: FlowSample,
                     generator: torch.Generator | None = None
                     ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor], Tensor]:
        """Returns ``(t_extra [E], x_extra [E, ...], (e, x1) [B, ...] each, rows [E])``.

        ``x1``, ``x0``: the batch and noise as drawn; ``cluster`` ``[B]`` their cluster ids;
        ``sample``: the main term's draw (its ``t``; with ``"main"`` pairing also its re-paired
        ``x1``, ``x0``, ``eps``). ``E = 2B`` rows ``x_t`` then ``e_t`` (published), or ``E = B``
        rows ``e_t`` (main). ``e`` are the centroids of ``cluster``; the ``x1`` returned is the
        one the loss compares ``e`` with; ``rows``, the image of the batch as drawn each extra row
        is about (``e_t``: the image whose centroid it is; main: the main term's ``sample.index``).
        The fresh ``eps`` comes from ``generator`` (on ``x1``'s device; torch's global RNG when
        ``None``).
        """
        if self.centroids is None:
            raise RuntimeError("AnchorRegularizer.before_step(step) must run before the first extra_inputs call.")
        e = self.centroids.index_select(0, cluster.to(self.centroids.device)).to(x1.device, x1.dtype)
        rows = torch.arange(x1.shape[0], device=x1.device)
        if self.pairing == "main":
            e_t = straight_line(sample.t, e, sample.x0, sample.eps, self.sigma)
            return sample.t, e_t, (e, sample.x1), rows if sample.index is None else sample.index
        eps = torch.randn(x1.shape, dtype=x1.dtype, device=x1.device, generator=generator)
        x_t = straight_line(sample.t, x1, x0, eps, self.sigma)
        e_t = straight_line(sample.t, e, x0, eps, self.sigma)
        return torch.cat([sample.t, sample.t]), torch.cat([x_t, e_t]), (e, x1), torch.cat([rows, rows])

    def loss(self, vt: Tensor | None, v_extra: Tensor, ctx: tuple[Tensor, Tensor]) -> Tensor:
        """Scalar anchor loss (``full`` or ``simple``) from the extra outputs ``v_extra`` ``[E, ...]``
        (and, with ``"main"`` pairing, the main prediction ``vt`` ``[B, ...]`` as ``v(x_t)``)."""
        e, x1 = ctx
        if self.pairing == "main":
            if vt is None:
                raise ValueError("the anchor loss with pairing='main' needs the main prediction vt.")
            v_x, v_e = vt, v_extra
        else:
            v_x, v_e = v_extra.chunk(2)
        diff = v_x - v_e
        if self.loss_type == "full":
            diff = diff + e - x1
        return diff.square().mean()

    # ------------------------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Centroids (when computed) and the subset generator's state: a resumed run continues
        with the same centroids and the same future subsets."""
        state = {"generator": self.generator.get_state()}
        if self.centroids is not None:
            state["centroids"] = self.centroids.clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        centroids = state.get("centroids")
        if centroids is not None:
            expected = (self.num_clusters, *self.images.shape[1:])
            if tuple(centroids.shape) != expected:
                raise ValueError(
                    f"stored centroids have shape {tuple(centroids.shape)}, expected {expected}: "
                    f"the checkpoint was trained with another --num_subclasses."
                )
            centroids = centroids.to(self.images.device, self.centroid_dtype)
        self.centroids = centroids

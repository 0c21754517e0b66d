"""The values the enumerated settings take and the published recipe's defaults, defined once for the
configs, the command line and the library modules that act on them (no absl, no torch)."""

# Flow matchers (method/flow_matching.py) and how otcfm draws pairs from its OT plan.
MATCHERS = ("otcfm", "icfm", "fm", "si")
OT_PAIRINGS = ("replacement", "permutation")
# Matchers whose x_t is the straight line t x1 + (1 - t) x0 (the anchor term's main pairing needs it).
STRAIGHT_LINE_MODELS = ("icfm", "otcfm")

# What a conditional run's labels are (training/conditioning.py): none (unconditional, the
# published nets), the CIFAR-10 class, or the K-means cluster (class * num_subclasses + sub).
CONDITIONS = ("none", "class", "cluster")

# ODE solvers (evaluation/solvers.py).
SOLVERS = ("dopri5", "euler", "midpoint", "heun", "rk4")

# The training forward's fast path (training/fast_path.py).
PRECISIONS = ("auto", "fp32", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")

# minibatch: the published sampler's MiniBatchKMeans (batches of min(1024, n), n_init="auto");
# lloyd: exact K-means (one k-means++ init), the recipe of earlier versions of this repo.
CLUSTER_ALGORITHMS = ("minibatch", "lloyd")
# The published clustering, the default of every script that clusters (training and evaluation
# must agree on it, or held-out scores would come from other clusters than training's).
PUBLISHED_NUM_SUBCLASSES, PUBLISHED_CLUSTER_ALGORITHM, PUBLISHED_CLUSTER_SEED = 25, "minibatch", 42

# The anchor regularizer (method/regularizers.py): its loss and where its x_t comes from.
ANCHOR_LOSS_TYPES = ("full", "simple")
ANCHOR_PAIRINGS = ("published", "main")

# The published TorchCFM 1.0.4 weights by method name (evaluation/pretrained.py holds their files).
PUBLISHED_WEIGHTS = ("otcfm", "icfm", "fm")

#: The configuration of the published CIFAR-10 UNet (35,746,307 parameters): `UNetModel`'s
#: construction arguments (method/unet), and the defaults of the architecture flags.
PAPER_CONFIG = dict(
    dim=(3, 32, 32),
    num_channels=128,
    num_res_blocks=2,
    channel_mult=(1, 2, 2, 2),
    attention_resolutions="16",
    num_heads=4,
    num_head_channels=64,
    dropout=0.1,
)

# Seconds a collective waits for a rank that stopped answering (io/distributed.py has the same
# default for a World built without a config; tests/test_config.py ties the two).
DEFAULT_COLLECTIVE_TIMEOUT_S = 300.0

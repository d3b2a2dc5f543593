"""The plan: the constants the code generator writes into each program (at the top of its runtime module).

The runtime pieces read these names; ``backends/torch_distributed.py`` writes their values, only those
that the program's runtime reads, at the top of the program's ``runtime.py``. Nothing of this file is copied
into a program: the values below are placeholders that keep the runtime modules importable and lint-clean,
and the docstrings are the contract between the generator and the runtime. The generated functions
(``forward``, a pipeline's stage functions) stay in ``main.py``, which passes them to the training loop.
"""
PLAN_TEXT = ""
"""The plan as DSL text (as in the program's docstring), recorded in checkpoints."""
MESH_AXES = ()
"""Names of the mesh axes, outermost first, e.g. ``("dp", "tp")``."""
MESH_SHAPE = ()
"""Size of each mesh axis."""
MESH_DEVICES = [[]]
"""The global ranks of each pipeline position (one list without pipelining); each position runs the
mesh ``MESH_SHAPE`` on its own devices, in row-major order of the mesh coordinates."""
INPUTS = []
"""Per model input: ``(name, dims, dtype, layout per mesh axis, exclusive upper bound of synthetic
integer values)``; a dim is an int or the name of a symbolic size (``"batch"``)."""
PARAMS = {}
"""Plain programs: ``{state_dict name: layout per mesh axis}`` of every parameter."""
BUFFERS = {}
"""Plain programs: ``{state_dict name: layout per mesh axis}`` of every buffer."""
STAGE_TENSORS = {}
"""Pipelined programs: ``{IR name: (state_dict name, "param" or "buffer", layout, stage)}``."""
FROZEN_PARAMS = []
"""Parameters the model froze (``requires_grad=False``): no gradient, no optimizer state."""
NOT_SAVED = []
"""Buffers outside the model's state_dict (non-persistent buffers, lifted constants), by state_dict
name: left out of ``--save``, taken from the emitted ``weights.pt`` when ``--weights`` lacks them."""
ALIASES = {}
"""``{alias: state_dict name}`` for tied parameters, restored in the saved state_dict."""
GRAD_BUCKETS = []
"""``[(mesh axes, [parameter names])]``: gradients all-reduced together, in the order backward makes them."""
GRAD_REDUCE_DTYPE = None
"""The dtype gradient buckets are all-reduced in (the plan's precision ``reduce``); None: their own."""
TIED_PARAMS = []
"""Pipelined programs: the IR names of the copies of each parameter shared by several stages."""
LOSS_SBP = []
"""The loss's layout per mesh axis."""
OPTIMIZER = ("SGD", {})
"""``(torch.optim class name, keyword arguments)``."""
EXAMPLE_DIMS = {}
"""The symbolic sizes of the example batch (the shapes of synthetic batches)."""
PIPELINE = {}
"""``{"stages": K, "positions": [position of each stage], "microbatches": m, "paths": [stages visited by
each microbatch], "skippable": whether stages may be skipped at inference}``."""
SCHEDULE = {}
"""``{rank: [(kind, stage, microbatch, peer)]}``: each rank's actions, kinds ``F``, ``B``, ``SEND_F``,
``RECV_F``, ``SEND_B``, ``RECV_B``."""

"""The cost model: what a plan costs on a cluster. Imports only :mod:`ir` and :mod:`cluster`.

- :mod:`.collectives`: collective and point-to-point time over the cluster's links, traffic per link class.
- :mod:`.ops`: per-op FLOPs and bytes, precision, and the roofline-over-efficiency formula work is priced by.
- :mod:`.memory`: parameters, gradients, optimizer state and activations per device.
- :mod:`.boxing`: what one boxing step costs (bytes without a cluster, seconds on one).
- :mod:`.segments`: per-segment costs (affine in the microbatch size) and the profile the estimator prices.
- :mod:`.placement`: device lists, axis groups, stage ranges and the numbers of a strategy (``PlanShape``).
- :mod:`.estimate`: step time, memory and traffic of a placed profile (the planner's and the simulator's).
- :mod:`.timeline`: the timing of pipeline schedules.
- :mod:`.op_probes`, :mod:`.calibrate`: measuring this machine's constants for the model (``sbpc calibrate``).
"""

"""Collection backends behind `gptfluence.dynamics.collect.collect` (``backend=``):

* ``local`` (default, in `collect` itself): one run at a time per worker process;
* ``batched`` (`batched`): R runs trained together in one process through ``torch.func``
  (stacked parameters, vectorised forward/backward, one AdamW equal to R separate ones);
* ``ray`` (`ray_backend`): every run is a Ray task, on the local machine or an existing cluster.

Every backend commits each run folder through the same store code (`Dynamics.stage_run` ...
``commit``: one atomic rename), so any interrupted collection resumes from its finished runs.
"""

BACKENDS = ("local", "batched", "ray")

"""Models of K-FAC's cost at any scale, outside the runtime (which never imports this package).

* :mod:`~kfac_hvd.analysis.traffic`, :mod:`~kfac_hvd.analysis.replay`: Fisher traffic per rank, every
  step or along a recorded schedule replayed at another scale;
* :mod:`~kfac_hvd.analysis.timemodel` (with :mod:`~kfac_hvd.analysis.network` and
  :mod:`~kfac_hvd.analysis.devices`): seconds per phase of a step;
* :mod:`~kfac_hvd.analysis.commodel`: their command, ``python -m kfac_hvd.analysis.commodel``.

Every layer's bytes, messages and FLOPs come from :func:`kfac_hvd.cost.layer_cost`, as in the runtime.
"""

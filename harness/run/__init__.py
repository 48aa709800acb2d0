"""One run in stages (issue 13 point 2), orchestrated by :mod:`harness.runner`:

* :mod:`harness.run.plan`: scenario + host facts -> the QEMU argv of source and
  destination (:class:`~harness.run.plan.RunPlan`), pure;
* :mod:`harness.run.observe`: what the session saw, as frozen values (the
  :class:`~harness.run.observe.Timeline`, marks, probe records, QMP answers,
  KVM samples, trace) and the per-stage timer (:class:`~harness.run.observe.Stages`);
* :mod:`harness.run.row`: observations -> the typed CSV row
  (:class:`~harness.run.row.Row`, one field per :data:`harness.results.COLUMNS`), pure.
"""

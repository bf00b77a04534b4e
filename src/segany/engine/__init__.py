"""The data engine (SAM paper, section 4): model-assisted annotation that feeds training.

* :mod:`segany.engine.dataset`  the dataset folder a run writes (SA-1B files + a SQLite manifest);
* :mod:`segany.engine.annotate` stage 3 (fully automatic) and stage 2 (semi-automatic) annotation of a
  folder, resumable, in-process or on Ray (:mod:`segany.engine.ray_backend`);
* :mod:`segany.engine.semi`     stage 2's overlap filter and the "still uncovered" report for people;
* :mod:`segany.engine.stats`    ``segany dataset-stats``: the SA-1B paper's dataset figures;
* :mod:`segany.engine.loop`     ``segany engine``: annotate -> train -> evaluate, round after round;
* the commands are :mod:`segany.commands.engine`'s.
"""

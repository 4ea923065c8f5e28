"""The data-quality stage: what is wrong with the data, answered from the cached features.

Every part runs on a bounded piece and writes a small result; :mod:`summary` combines them.

- ``neighbors.py``: each sample's nearest neighbours (cosine, faiss on blocks: a block of
  query rows against the shards streamed block by block; never an N×N matrix).
- ``labels.py``: out-of-fold probe predictions (one fold per task) and a noise model on
  them (confident learning, cleanlab, as a second opinion): label issues, ranked, with the
  suggested label and how sure each is.
- ``curve.py``: the learning curve (probe top-1 on fractions of the training set) and the
  power law fitted to it.
- ``shift.py``: train-vs-test domain classifier AUC (overall and per class), class balance.
- ``probing.py``: what needs the backbone itself: near-duplicate similarity calibrated on
  perturbed copies of the job's images, and how familiar the images look to the pretrained
  classifier (distance from the pretraining domain).
- ``summary.py``: duplicates and leaks, outliers, and every part into the report's section.
"""

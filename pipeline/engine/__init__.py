"""The data-parallel training engine: ``torch.distributed`` (DDP; NCCL on GPU, gloo on CPU),
launched with ``torch.distributed.run`` (torchrun) and a c10d rendezvous.

``dist.py`` is what a training program sees inside a rank (:class:`~pipeline.engine.dist.Rank`:
its place in the world, gathering across ranks, agreeing on a stop, checkpoints written by
rank 0); ``launch.py`` starts and supervises one node's torchrun. A program (pretraining,
fine-tuning) is plain code on top of these; the job layer decides where it runs.
"""

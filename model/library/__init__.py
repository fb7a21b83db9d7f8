"""Tag a whole photo library: ``phototag tag PATH...``.

The model-side pipeline (:class:`model.tagger.Tagger`) run over folders instead of uploads, with
the tags kept in files people own:

    walk.py      folders -> candidate files (recursive, symlink loops safe, hidden files skipped)
    tagging.py   the batch tagging class: a checkpoint loaded once, photos read and decoded on
                 threads, forward passes in batches; the local and Ray engines both call it
                 (remote.py: the same for a running server's ``POST /v1/tags``)
    engines.py   the local engine (decode pool overlapped with the forward pass, bounded
                 queues) and the Ray Data engine
    xmp.py       XMP sidecars (and opt-in embedding): machine tags under one root, merged
                 beside the keywords a person wrote, never over them
    journal.py   the append-only, fsync'd record of what a run finished: resume, exactly once
    results.py   the ``--out`` file (JSON Lines or Parquet), one row per photo
    cli.py       ``main(argv)``: ``phototag tag``
"""

"""The fetch stage: read poster sources, download or read every image, keep the ones that decode.

``params`` declares the sources and limits, ``sources`` turns them into rows with URLs,
``urls`` decides which URLs may be fetched, ``http`` and ``local`` get the bytes,
``engine`` runs it all concurrently into the shard store, ``journal`` makes it resumable
and ``run`` writes the stage's table.
"""

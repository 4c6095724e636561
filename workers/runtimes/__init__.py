"""Model runtimes: one module per model kind behind one interface (base.Runtime).

base.py     the interface every kind implements and the Annotation it returns
loading.py  where weights come from (HF id, local directory, cache, offline) and on what device
tiny.py     the tiny random twins of every kind, for tests and offline demos
registry.py kind name -> runtime class, and loading the kinds a worker serves
blip2.py    BLIP-2 captions (kind `caption`)
wd14.py     WD14 tags (kind `tags`)
clip.py     CLIP image and text embeddings
interrogate.py  CLIP Interrogator prompts: a caption and the closest terms (kind `interrogate`)
"""

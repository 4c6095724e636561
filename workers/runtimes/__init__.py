"""Model runtimes: one module per model kind behind one interface (base.Runtime).

base.py     the interface every kind implements and the Annotation it returns
loading.py  where weights come from (HF id, local directory, cache, offline) and on what device
tiny.py     the tiny random twins of every kind, for tests and offline demos
blip2.py    BLIP-2 captions
"""

"""The data room: dataset readers into manifests, lesion-grouped splits, the decode-once image cache.

Import from the modules (`data.manifest`, `data.split`, `data.images`, `data.cache`): this package module stays
empty so that importing one of them (the command line's parser needs `manifest.FORMATS`) does not load the others'
libraries (scikit-learn and SciPy for splits).
"""

"""The registry sidecar: converts pushed image layers into lazily loadable EROFS blobs and attaches an index
referrer to each image (see ``convert``, ``index``, ``sidecar``)."""

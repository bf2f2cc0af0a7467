//! Images: shared content-addressed cache, catalog, downloads, per-VM overlays.

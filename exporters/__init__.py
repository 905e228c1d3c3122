"""Writers of a materialized slimc model: one model + one plan in, one deployable artifact out."""

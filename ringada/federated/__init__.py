"""Pure pieces of star mode: aggregation, server scheduling, client selection, resource allocation."""

"""What crfs-merge keeps on disk: layers turned into indexed tars, sealed index and tree
files, the eStargz chunk cache, and the cache's bounds and pruning."""

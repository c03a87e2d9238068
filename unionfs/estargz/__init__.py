"""eStargz: the TOC and footer format (pure), the writer used by `convert`, and lazy layers
that fetch only the chunks a read needs."""

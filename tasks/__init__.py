"""cab's tasks, one module per task; `cab.tasks.load_tasks` imports this folder as the package `cab_tasks`.
Modules whose names start with an underscore hold shared helpers (data files, caching, model heads)."""

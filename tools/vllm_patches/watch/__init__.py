"""Release watching: what the package index has that the series and the table do not
(:mod:`.news`), and carrying the series onto one new vLLM release, with the pull request's
body (:mod:`.carry`). ``.github/workflows/watch-releases.yml`` runs both daily."""

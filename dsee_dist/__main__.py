from dsee_dist.cli import main

raise SystemExit(main())

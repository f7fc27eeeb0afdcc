from glow_dist.cli import main

raise SystemExit(main())

from tokenfan.ops.cli import main

raise SystemExit(main())

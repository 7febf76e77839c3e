from service.batch.cli import main

raise SystemExit(main())
